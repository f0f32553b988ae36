"""A fast, deterministic OpenAI-compatible upstream for tests, the demo and benchmarks.

Owns a raw ASGI app (:class:`MockUpstream`, no framework, for speed) serving
``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and ``/v1/models``,
plus ``/_mock/stats`` and ``/_mock/reset`` for tests; :func:`run_mock_upstream` serves it
with hypercorn's trio worker and :func:`main` is the ``airgate mock-upstream`` CLI.

Token accounting is predictable: prompt tokens are whitespace-separated words (minimum 1),
and the completion is ``chunk_count`` pieces of ``"tok "``, one token each. The bearer key
picks a fault mode: ``mock-<mode>`` or ``mock-<mode>-<anything>`` with mode one of
``500 429 quota 401 hang cut malformed slow``; any other key is healthy. A request may
carry ``"mock": {"chunks": n, "ttft_ms": x, "chunk_delay_ms": y}`` to shape its response
(and ``"ignore_max_tokens": true`` to overrun the request's token limit).

Must not import ``proxy``, ``workers`` or ``store``: the gateway is reached only over HTTP.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import os
import signal
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, cast

import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

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


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away first."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def _unless_disconnected(receive: Receive, work: Callable[[], Awaitable[None]]) -> bool:
    """Run ``work`` while watching for ``http.disconnect``; False if the client left first.

    hypercorn silently drops sends after a disconnect, so only ``receive()`` tells us.
    """
    finished = False

    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        async def run() -> None:
            nonlocal finished
            await work()
            finished = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        nursery.start_soon(run)
    return finished


async def _send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    all_headers = [_JSON_TYPE, (b"content-length", str(len(body)).encode())]
    if headers:
        all_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _bad_request(exc: _BadRequest) -> bytes:
    return _error_body(exc.message, "invalid_request_error", None, exc.param)


class MockUpstream:
    """The ASGI app. Its state (the stats) is touched only by its own request tasks."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.stats = MockStats()
        self._models = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": _MODELS_CREATED, "owned_by": "mock"}
                    for m in config.models
                ],
            }
        )
        self._routes: dict[tuple[str, str], Callable[..., Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("GET", "/v1/models"): self._list_models,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        if body is None:
            return
        method, path = scope["method"], scope["path"]
        if path.startswith("/_mock/"):
            await self._introspect(method, path, send)
        elif (method, path) in self._routes:
            await self._v1(self._routes[method, path], scope, body, receive, send)
        elif path.startswith("/v1/"):
            error = _error_body(
                f"Unknown request URL: {method} {path}.", "invalid_request_error", "unknown_url"
            )
            await _send_json(send, 404, error)
        else:
            await _send_json(send, 404, _error_body("Not found.", "invalid_request_error", None))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _introspect(self, method: str, path: str, send: Send) -> None:
        if (method, path) == ("GET", "/_mock/stats"):
            await _send_json(send, 200, orjson.dumps(self.stats.snapshot()))
        elif (method, path) == ("POST", "/_mock/reset"):
            self.stats.reset()
            await _send_json(send, 200, b'{"reset":true}')
        else:
            await _send_json(send, 404, _error_body("Not found.", "invalid_request_error", None))

    async def _v1(
        self,
        handler: Callable[..., Awaitable[None]],
        scope: Scope,
        body: bytes,
        receive: Receive,
        send: Send,
    ) -> None:
        key = _bearer(scope["headers"])
        if key is None:
            await _send_json(send, 401, _MISSING_KEY)
            return
        self.stats.requests[key] = self.stats.requests.get(key, 0) + 1
        mode = _mode(key)
        if mode in _FAULTS:
            status, headers, error = _FAULTS[mode]
            await _send_json(send, status, error, headers)
            return
        if mode == "hang":
            await self._hang(receive)
            return
        request: Any = None
        if scope["method"] == "POST":
            try:
                request = orjson.loads(body)
            except orjson.JSONDecodeError:
                await _send_json(send, 400, _BAD_JSON)
                return
            if not isinstance(request, dict):
                await _send_json(send, 400, _BAD_JSON)
                return
        try:
            await handler(request, mode, receive, send)
        except _BadRequest as exc:
            await _send_json(send, 400, _bad_request(exc))

    async def _hang(self, receive: Receive) -> None:
        self.stats.active_streams += 1
        try:
            await _unless_disconnected(receive, trio.sleep_forever)
            self.stats.disconnected_streams += 1
        finally:
            self.stats.active_streams -= 1

    async def _finish_json(
        self, receive: Receive, send: Send, mode: str | None, wait_s: float, payload: bytes
    ) -> None:
        """Send a non-streaming answer after ``wait_s``, honouring ``cut`` and ``malformed``."""
        if wait_s > 0 and not await _unless_disconnected(receive, partial(trio.sleep, wait_s)):
            return
        if mode == "cut":
            # Headers promise a body that never comes; returning makes hypercorn close the
            # connection. (ASGI cannot drop a connection before the status line is sent.)
            headers = [_JSON_TYPE, (b"content-length", str(len(payload)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            return
        await _send_json(send, 200, _MALFORMED_JSON if mode == "malformed" else payload)

    async def _stream(self, receive: Receive, send: Send, segments: list[Segment]) -> None:
        complete = segments[-1][1][-1] == _DONE if segments else False
        self.stats.active_streams += 1
        try:

            async def pump() -> None:
                await send(_SSE_START)
                for delay_s, parts in segments:
                    if delay_s > 0:
                        await trio.sleep(delay_s)
                    body = b"".join(parts)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                if complete:
                    await send(_END)

            if len(segments) <= 1:
                await pump()
                finished = True
            else:
                finished = await _unless_disconnected(receive, pump)
            if not finished:
                self.stats.disconnected_streams += 1
            elif complete:
                self.stats.completed_streams += 1
        finally:
            self.stats.active_streams -= 1

    async def _chat(
        self, request: dict[str, Any], mode: str | None, receive: Receive, send: Send
    ) -> None:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("messages must be a non-empty array", "messages")
        prompt_tokens = max(
            1, sum(_content_words(m.get("content")) for m in messages if isinstance(m, dict))
        )
        await self._generate(request, mode, receive, send, prompt_tokens, chat=True)

    async def _completions(
        self, request: dict[str, Any], mode: str | None, receive: Receive, send: Send
    ) -> None:
        prompt = request.get("prompt")
        if isinstance(prompt, str):
            words = _words(prompt)
        elif isinstance(prompt, list):
            words = sum(_prompt_part_tokens(p) for p in prompt)
        else:
            raise _BadRequest("prompt must be a string or an array", "prompt")
        await self._generate(request, mode, receive, send, max(1, words), chat=False)

    async def _generate(
        self,
        request: dict[str, Any],
        mode: str | None,
        receive: Receive,
        send: Send,
        prompt_tokens: int,
        *,
        chat: bool,
    ) -> None:
        model = request.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("model must be a non-empty string", "model")
        plan = _plan(self.config, request, mode)
        usage = _usage(prompt_tokens, plan.chunks)
        created = int(time.time())
        prefix, obj = ("chatcmpl-", "chat.completion") if chat else ("cmpl-", "text_completion")
        ident = prefix + os.urandom(12).hex()
        if not request.get("stream"):
            if chat:
                message = {"role": "assistant", "content": _PIECE * plan.chunks, "refusal": None}
                choice = {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": plan.finish_reason,
                }
            else:
                choice = {
                    "text": _PIECE * plan.chunks,
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": plan.finish_reason,
                }
            payload = orjson.dumps(
                {
                    "id": ident,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "system_fingerprint": _FINGERPRINT,
                    "choices": [choice],
                    "usage": usage,
                }
            )
            await self._finish_json(receive, send, mode, plan.wait_s, payload)
            return
        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        head = orjson.dumps(
            {
                "id": ident,
                "object": obj + ".chunk" if chat else obj,
                "created": created,
                "model": model,
                "system_fingerprint": _FINGERPRINT,
            }
        )
        start = b"data: " + head[:-1] + b',"choices":['
        end = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
        finishes = _CHAT_FINISH if chat else _TEXT_FINISH
        events = {
            "piece": start + (_CHAT_PIECE if chat else _TEXT_PIECE) + end,
            "finish": start + finishes[plan.finish_reason] + end,
        }
        if chat:
            events["role"] = start + _CHAT_ROLE + end
        if include_usage:
            events["usage"] = start + b'],"usage":' + orjson.dumps(usage) + b"}\n\n"
        await self._stream(receive, send, _stream_segments(plan, events, mode))

    async def _embeddings(
        self, request: dict[str, Any], mode: str | None, receive: Receive, send: Send
    ) -> None:
        model = request.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("model must be a non-empty string", "model")
        inputs = _embedding_inputs(request.get("input"))
        dim = _int_field(request, "dimensions", self.config.embedding_dim, 1)
        as_base64 = request.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            vector = _embedding(item, dim)
            encoded: list[float] | str = (
                base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = max(1, sum(_words(i) if isinstance(i, str) else len(i) for i in inputs))
        payload = orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
        wait_s = _plan(self.config, request, mode).ttft_s
        await self._finish_json(receive, send, mode, wait_s, payload)

    async def _list_models(
        self, request: None, mode: str | None, receive: Receive, send: Send
    ) -> None:
        await self._finish_json(
            receive, send, mode, _SLOW_TTFT_S if mode == "slow" else 0, self._models
        )


async def run_mock_upstream(
    config: MockConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the mock until cancelled; ``task_status.started(port)`` once listening.

    With ``port=0`` the kernel picks the port: hypercorn binds the socket and reports the
    bound address (``getsockname``) through its own ``task_status``, which we parse.
    """
    hyper = HypercornConfig()
    hyper.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hyper.accesslog = None
    hyper.errorlog = _LOG
    hyper.backlog = 1024
    hyper.keep_alive_max_requests = 1_000_000
    hyper.include_date_header = False
    app = MockUpstream(config)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(serve, cast(Any, app), hyper, mode="asgi"))
        task_status.started(int(binds[0].rsplit(":", 1)[1]))


async def _serve_and_announce(config: MockConfig, host: str, port: int) -> None:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(partial(run_mock_upstream, config, host=host, port=port))
        shown = f"[{host}]" if ":" in host else host
        print(f"mock upstream listening on http://{shown}:{bound}/v1", flush=True)
        # Ctrl-C or SIGTERM stops serving by cancellation, so the CLI exits quietly.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> None:
    """``airgate mock-upstream``: serve the mock in the foreground until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="airgate mock-upstream", description="Serve a fast OpenAI-compatible mock upstream."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="delay before first token")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between chunks")
    parser.add_argument("--chunks", type=int, default=20, help="completion tokens per answer")
    parser.add_argument("--embedding-dim", type=int, default=8)
    args = parser.parse_args(argv)
    config = MockConfig(
        ttft_ms=args.ttft_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        chunk_count=args.chunks,
        embedding_dim=args.embedding_dim,
    )
    trio.run(_serve_and_announce, config, args.host, args.port)


if __name__ == "__main__":
    main()
