"""The mock upstream's I/O-free part: its configuration and statistics, the fault modes,
the pre-encoded response pieces, deterministic token counts and embeddings, and the plan
of one response (how many chunks, which delays, which fault).

Must not import ``proxy``, ``workers`` or ``store``.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import orjson

Message = dict[str, Any]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# Delay in seconds before a run of bytes; a stream is a list of these.
Segment = tuple[float, list[bytes]]

_LOG = logging.getLogger("loadtest.mock_upstream")
_FINGERPRINT: Final = "fp_airgate_mock"
_PIECE: Final = "tok "
_MODELS_CREATED: Final = 1_700_000_000
_SLOW_TTFT_S: Final = 2.0
_MODES: Final = frozenset({"500", "429", "quota", "401", "hang", "cut", "malformed", "slow"})

_JSON_TYPE: Final = (b"content-type", b"application/json")
_SSE_START: Final[Message] = {
    "type": "http.response.start",
    "status": 200,
    "headers": [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-cache"),
    ],
}
_END: Final[Message] = {"type": "http.response.body", "body": b"", "more_body": False}
_DONE: Final = b"data: [DONE]\n\n"
_MALFORMED_EVENT: Final = b'data: {"id": "chatcmpl-broken", "choices": [{"delta": \n\n'
_MALFORMED_JSON: Final = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choi'


@dataclass(frozen=True)
class MockConfig:
    """How the mock answers when a request does not say otherwise."""

    ttft_ms: float = 0
    chunk_delay_ms: float = 0
    chunk_count: int = 20
    embedding_dim: int = 8
    models: tuple[str, ...] = ("gpt-4o-mini", "deepseek-v4-flash", "text-embedding-3-small")

    def __post_init__(self) -> None:
        if self.ttft_ms < 0 or self.chunk_delay_ms < 0:
            raise ValueError("ttft_ms and chunk_delay_ms must be >= 0")
        if self.chunk_count < 0 or self.embedding_dim < 1:
            raise ValueError("chunk_count must be >= 0 and embedding_dim >= 1")


@dataclass
class MockStats:
    """Counters for tests. ``active_streams`` is a gauge and survives a reset."""

    requests: dict[str, int] = field(default_factory=dict)
    active_streams: int = 0
    completed_streams: int = 0
    disconnected_streams: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "active_streams": self.active_streams,
            "completed_streams": self.completed_streams,
            "disconnected_streams": self.disconnected_streams,
        }

    def reset(self) -> None:
        self.requests.clear()
        self.completed_streams = 0
        self.disconnected_streams = 0


@dataclass(frozen=True)
class _Plan:
    """The shape of one generation, after config, fault mode, override and max_tokens."""

    chunks: int
    finish_reason: str
    ttft_s: float
    delay_s: float

    @property
    def wait_s(self) -> float:
        """How long a non-streaming answer takes: first token plus the gaps between."""
        return self.ttft_s + self.delay_s * max(self.chunks - 1, 0)


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    error = {"message": message, "type": type_, "param": param, "code": code}
    return orjson.dumps({"error": error})


_FAULTS: Final[dict[str, tuple[int, list[tuple[bytes, bytes]], bytes]]] = {
    "500": (
        500,
        [],
        _error_body("The server had an error while processing your request.", "server_error", None),
    ),
    "429": (
        429,
        [(b"retry-after", b"2")],
        _error_body("Rate limit reached for requests (mock).", "requests", "rate_limit_exceeded"),
    ),
    "quota": (
        429,
        [],
        _error_body(
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        ),
    ),
    "401": (
        401,
        [],
        _error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    ),
}
_MISSING_KEY: Final = _error_body(
    "You didn't provide an API key. Provide it in the Authorization header (Bearer auth).",
    "invalid_request_error",
    None,
)
_BAD_JSON: Final = _error_body(
    "We could not parse the JSON body of your request.", "invalid_request_error", None
)


_CHAT_ROLE: Final = orjson.dumps(
    {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
)
_CHAT_PIECE: Final = orjson.dumps(
    {"index": 0, "delta": {"content": _PIECE}, "logprobs": None, "finish_reason": None}
)
_TEXT_PIECE: Final = orjson.dumps(
    {"text": _PIECE, "index": 0, "logprobs": None, "finish_reason": None}
)
_CHAT_FINISH: Final = {
    reason: orjson.dumps({"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason})
    for reason in ("stop", "length")
}
_TEXT_FINISH: Final = {
    reason: orjson.dumps({"text": "", "index": 0, "logprobs": None, "finish_reason": reason})
    for reason in ("stop", "length")
}


def _words(text: object) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def _prompt_part_tokens(part: object) -> int:
    """A completions prompt item: text counts words, a token id one, a token array its length."""
    if isinstance(part, list):
        return len(part)
    return 1 if isinstance(part, int) else _words(part)


def _content_words(content: object) -> int:
    if isinstance(content, list):
        return sum(_words(part.get("text")) for part in content if isinstance(part, dict))
    return _words(content)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _int_field(obj: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = obj.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _BadRequest(f"{name} must be an integer >= {minimum}", name)
    return value


def _ms_field(obj: dict[str, Any], name: str, default: float) -> float:
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _BadRequest(f"mock.{name} must be a number >= 0", f"mock.{name}")
    return float(value) / 1000


def _plan(config: MockConfig, body: dict[str, Any], mode: str | None) -> _Plan:
    override = body.get("mock") or {}
    if not isinstance(override, dict):
        raise _BadRequest("mock must be an object", "mock")
    chunks = _int_field(override, "chunks", config.chunk_count, 0)
    ttft_s = _ms_field(override, "ttft_ms", config.ttft_ms)
    delay_s = _ms_field(override, "chunk_delay_ms", config.chunk_delay_ms)
    if mode == "slow":
        ttft_s = _SLOW_TTFT_S
    limit_name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    limit = _int_field(body, limit_name, chunks, 1)
    if override.get("ignore_max_tokens") is True:  # an upstream that overruns the limit
        limit = chunks
    if limit < chunks:
        return _Plan(limit, "length", ttft_s, delay_s)
    return _Plan(chunks, "stop", ttft_s, delay_s)


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


def _mode(key: str) -> str | None:
    if not key.startswith("mock-"):
        return None
    mode = key[5:].split("-", 1)[0]
    return mode if mode in _MODES else None


def _embedding(item: str | list[int], dim: int) -> list[float]:
    seed = item.encode() if isinstance(item, str) else orjson.dumps(item)
    raw = hashlib.shake_128(seed).digest(2 * dim)
    values = [v / 32767.5 - 1.0 for v in struct.unpack(f"<{dim}H", raw)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


def _embedding_inputs(value: object) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [cast(list[int], value)]
        if all(isinstance(v, str) for v in value) or all(
            isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value
        ):
            return cast(list[str | list[int]], value)
    raise _BadRequest("input must be a string, a list of strings or token arrays", "input")


def _stream_segments(plan: _Plan, events: dict[str, bytes], mode: str | None) -> list[Segment]:
    """Lay out a stream's events; runs with no delay between them share one send."""
    segments: list[Segment] = []

    def emit(delay_s: float, data: bytes) -> None:
        if segments and delay_s <= 0:
            segments[-1][1].append(data)
        else:
            segments.append((delay_s, [data]))

    if "role" in events:
        emit(0, events["role"])
    fault_at = plan.chunks // 2 if mode in ("cut", "malformed") else -1
    wait_s = plan.ttft_s
    for index in range(plan.chunks + 1):
        if index == fault_at:
            if mode == "cut":
                return segments
            emit(0, _MALFORMED_EVENT)
        if index < plan.chunks:
            emit(wait_s, events["piece"])
            wait_s = plan.delay_s
    emit(wait_s if plan.chunks == 0 else 0, events["finish"])
    if "usage" in events:
        emit(0, events["usage"])
    emit(0, _DONE)
    return segments
