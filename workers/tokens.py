"""Token estimates without a tokenizer, and usage accounting for relayed streams.

Owns the estimation heuristic (:func:`estimate_text_tokens`,
:func:`estimate_prompt_tokens`), the :class:`Usage` value, :func:`usage_from_response` for
non-stream responses and :class:`StreamTokenCounter` for streams. Estimates are used to
reserve tpm budget and balance before a request is sent and as the fallback bill when the
upstream reports no usage; the upstream's own numbers win whenever they exist.

The heuristic (no tokenizer can be shipped here): every ASCII character is a quarter of a
token and every other character a whole token, rounded up, at least 1 for non-empty text.
This matches BPE tokenizers on English prose and code (about 4 characters per token) and on
CJK text (about 1 character per token); it overestimates accented Latin, Cyrillic and
similar scripts, which is the safe side for a reservation.

Pure Python plus orjson: no I/O, no trio, no httpx. Imports nothing from the gateway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import orjson

#: Added per chat message for the role and the message framing (OpenAI's cookbook uses 3-4).
TOKENS_PER_MESSAGE = 4
#: Added once per chat request: the reply is primed with ``<|start|>assistant<|message|>``.
TOKENS_REPLY_PRIMING = 3
#: An image part at ``detail: "low"`` costs a flat 85 tokens at OpenAI.
TOKENS_IMAGE_LOW = 85
#: A 1024x1024 image at high/auto detail: 85 + 4 tiles * 170. Used for every other image.
TOKENS_IMAGE_HIGH = 765


class Endpoint(StrEnum):
    """The request shapes :func:`estimate_prompt_tokens` understands."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


_ENDPOINT_ALIASES: dict[str, Endpoint] = {
    "chat": Endpoint.CHAT,
    "chat/completions": Endpoint.CHAT,
    "/v1/chat/completions": Endpoint.CHAT,
    "completions": Endpoint.COMPLETIONS,
    "/v1/completions": Endpoint.COMPLETIONS,
    "embeddings": Endpoint.EMBEDDINGS,
    "/v1/embeddings": Endpoint.EMBEDDINGS,
}


def _char_counts(text: str) -> tuple[int, int]:
    """(ASCII characters, other characters) in ``text``."""
    if text.isascii():
        return len(text), 0
    ascii_chars = len(text.encode("ascii", "ignore"))
    return ascii_chars, len(text) - ascii_chars


def _tokens_from_counts(ascii_chars: int, other_chars: int) -> int:
    return -(-ascii_chars // 4) + other_chars


def estimate_text_tokens(text: str) -> int:
    """Estimated tokens in ``text``: ceil(ASCII chars / 4) + other chars; 0 only if empty."""
    return _tokens_from_counts(*_char_counts(text))


def _json_tokens(value: Any) -> int:
    try:
        return estimate_text_tokens(orjson.dumps(value).decode())
    except TypeError:  # not JSON-serialisable: nothing sensible to count
        return 0


def _part_tokens(part: Any) -> int:
    if isinstance(part, str):
        return estimate_text_tokens(part)
    if not isinstance(part, Mapping):
        return 0
    kind = part.get("type")
    if kind == "image_url":
        image = part.get("image_url")
        low = isinstance(image, Mapping) and image.get("detail") == "low"
        return TOKENS_IMAGE_LOW if low else TOKENS_IMAGE_HIGH
    for field in ("text", "refusal"):
        value = part.get(field)
        if isinstance(value, str):
            return estimate_text_tokens(value)
    # Audio, files and unknown parts: no basis for an estimate; the upstream's usage bills.
    return 0


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return estimate_text_tokens(content)
    if isinstance(content, list):
        return sum(_part_tokens(part) for part in content)
    return 0


def _message_tokens(message: Any) -> int:
    if not isinstance(message, Mapping):
        return 0
    total = TOKENS_PER_MESSAGE + _content_tokens(message.get("content"))
    name = message.get("name")
    if isinstance(name, str):
        total += 1 + estimate_text_tokens(name)
    for key in ("tool_calls", "function_call"):
        if message.get(key):
            total += _json_tokens(message[key])
    return total


def _input_tokens(value: Any) -> int:
    """Tokens of a completions ``prompt`` or embeddings ``input``.

    A string, a list of strings, a list of token ids (one token each) or a list of lists of
    token ids.
    """
    if isinstance(value, str):
        return estimate_text_tokens(value)
    if not isinstance(value, list):
        return 0
    total = 0
    for item in value:
        if isinstance(item, str):
            total += estimate_text_tokens(item)
        elif isinstance(item, int):
            total += 1
        elif isinstance(item, list):
            total += len(item)
    return total


def estimate_prompt_tokens(body: Mapping[str, Any], endpoint: str) -> int:
    """Estimated prompt tokens of a request ``body`` for ``endpoint``.

    ``endpoint`` is an :class:`Endpoint` value or its URL path (``/v1/chat/completions``).
    Chat counts every message's content (string or parts), name and tool calls plus
    :data:`TOKENS_PER_MESSAGE` each, the reply priming, and the JSON of ``tools`` /
    ``functions`` definitions. Parts of the body that do not have the documented shape are
    skipped, not rejected: validating the request is not this function's job.
    Raises ValueError for an unknown endpoint.
    """
    kind = _ENDPOINT_ALIASES.get(endpoint)
    if kind is None:
        raise ValueError(f"unknown endpoint {endpoint!r}")
    if kind is Endpoint.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return 0
        total = TOKENS_REPLY_PRIMING + sum(_message_tokens(m) for m in messages)
        for key in ("tools", "functions"):
            if body.get(key):
                total += _json_tokens(body[key])
        return total
    if kind is Endpoint.COMPLETIONS:
        return _input_tokens(body.get("prompt"))
    return _input_tokens(body.get("input"))


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one request. ``cached_tokens`` is part of ``prompt_tokens``."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _count(value: Any) -> int | None:
    """A token count if ``value`` is a non-negative int (bools are not counts)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def parse_usage(usage: Any) -> Usage | None:
    """Read an OpenAI ``usage`` object; None if it is absent, null or malformed.

    ``completion_tokens`` may be missing (embeddings) and counts as 0, but at least one of
    ``prompt_tokens`` / ``completion_tokens`` must be present. Cached tokens come from
    ``prompt_tokens_details.cached_tokens``, else DeepSeek's ``prompt_cache_hit_tokens``,
    and are clipped to ``prompt_tokens`` so that a confused upstream cannot make the cached
    part larger than the whole.
    """
    if not isinstance(usage, Mapping):
        return None
    raw_prompt = usage.get("prompt_tokens")
    raw_completion = usage.get("completion_tokens")
    if raw_prompt is None and raw_completion is None:
        return None
    prompt = 0 if raw_prompt is None else _count(raw_prompt)
    completion = 0 if raw_completion is None else _count(raw_completion)
    if prompt is None or completion is None:
        return None
    cached = 0
    details = usage.get("prompt_tokens_details")
    if isinstance(details, Mapping) and _count(details.get("cached_tokens")) is not None:
        cached = details["cached_tokens"]
    elif _count(usage.get("prompt_cache_hit_tokens")) is not None:
        cached = usage["prompt_cache_hit_tokens"]
    return Usage(prompt, min(cached, prompt), completion)


def usage_from_response(body: Mapping[str, Any]) -> Usage | None:
    """The upstream's usage in a non-stream response body, if it reported a valid one."""
    return parse_usage(body.get("usage"))


def estimate_completion_tokens(body: Mapping[str, Any]) -> int:
    """Completion tokens of a whole (non-stream) response, for when it carries no usage."""
    total = 0
    choices = body.get("choices")
    if not isinstance(choices, list):
        return 0
    for choice in choices:
        if not isinstance(choice, Mapping):
            continue
        text = choice.get("text")
        message = choice.get("message")
        if isinstance(text, str):
            total += estimate_text_tokens(text)
        if isinstance(message, Mapping):
            for name in ("content", "reasoning_content", "refusal"):
                value = message.get(name)
                if isinstance(value, str):
                    total += estimate_text_tokens(value)
            calls = message.get("tool_calls")
            if isinstance(calls, list):
                total += _json_tokens(calls)
    return total


def is_usage_only(chunk: Mapping[str, Any]) -> bool:
    """Whether a stream chunk carries only usage (``choices == []`` and a usage object).

    OpenAI sends one such chunk before ``[DONE]`` when ``stream_options.include_usage`` is
    set; the gateway drops it when the client did not ask for usage.
    """
    choices = chunk.get("choices")
    return isinstance(choices, list) and not choices and isinstance(chunk.get("usage"), Mapping)


class MalformedChunk(ValueError):
    """A stream ``data`` payload is not a JSON object (nor ``[DONE]``)."""


class ChunkInfo(NamedTuple):
    """What the gateway needs to know about one stream chunk."""

    done: bool = False
    """The payload was ``[DONE]``."""
    usage_only: bool = False
    """Only usage, no choices: drop it if the client did not ask for usage."""
    usage: Usage | None = None
    """The usage this chunk reported, if any."""
    error: Mapping[str, Any] | None = None
    """An ``error`` object sent inside the stream (classify it as an upstream failure)."""


_DONE = ChunkInfo(done=True)
_PLAIN = ChunkInfo()
_DELTA_TEXT_FIELDS = ("content", "reasoning_content", "refusal")


class StreamTokenCounter:
    """Accumulates completion-token estimates and upstream usage over one stream.

    Feed it every decoded SSE ``data`` payload of a chat or completions stream. The
    estimate counts the text of ``delta.content``, ``delta.reasoning_content``,
    ``delta.refusal``, tool and function call names and arguments, and completions
    ``choices[].text`` with the module heuristic over the concatenated text, but never
    less than one token per non-empty text piece (upstreams emit at least one token per
    piece). :attr:`upstream_usage` keeps the last valid usage object seen (some upstreams
    repeat a cumulative usage on every chunk).
    """

    __slots__ = ("_ascii", "_other", "_pieces", "done", "upstream_usage")

    def __init__(self) -> None:
        self._ascii = 0
        self._other = 0
        self._pieces = 0
        self.done = False
        self.upstream_usage: Usage | None = None

    @property
    def completion_tokens_estimate(self) -> int:
        return max(self._pieces, _tokens_from_counts(self._ascii, self._other))

    def _add(self, text: str) -> None:
        if text.isascii():
            self._ascii += len(text)
        else:
            ascii_chars = len(text.encode("ascii", "ignore"))
            self._ascii += ascii_chars
            self._other += len(text) - ascii_chars
        self._pieces += 1

    def _add_choice(self, choice: dict[str, Any]) -> None:
        text = choice.get("text")  # completions
        if type(text) is str and text:
            self._add(text)
        delta = choice.get("delta")
        if type(delta) is not dict:
            return
        # Usually one or two keys ({"content": ...}, maybe "role"): walk what is there.
        for name, value in delta.items():
            if type(value) is str:
                if value and name in _DELTA_TEXT_FIELDS:
                    self._add(value)
            elif name == "tool_calls" and type(value) is list:
                for call in value:
                    if type(call) is dict:
                        self._add_function(call.get("function"))
            elif name == "function_call":
                self._add_function(value)

    def _add_function(self, function: Any) -> None:
        if type(function) is dict:
            for name in ("name", "arguments"):
                value = function.get(name)
                if type(value) is str and value:
                    self._add(value)

    def feed(self, data: bytes) -> ChunkInfo:
        """Account for one ``data`` payload. Raises :class:`MalformedChunk` if it is not JSON."""
        if data[:1] != b"{" and data.strip() == b"[DONE]":
            self.done = True
            return _DONE
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise MalformedChunk(f"stream chunk is not valid JSON: {exc}") from exc
        if type(chunk) is not dict:
            raise MalformedChunk("stream chunk is not a JSON object")
        choices = chunk.get("choices")
        if type(choices) is list:
            for choice in choices:
                if type(choice) is dict:
                    self._add_choice(choice)
        raw_usage = chunk.get("usage")
        error = chunk.get("error")
        if raw_usage is None and error is None:
            return _PLAIN  # the usual chunk: nothing but choices
        usage = parse_usage(raw_usage)
        if usage is not None:
            self.upstream_usage = usage
        return ChunkInfo(
            done=False,
            usage_only=is_usage_only(chunk),
            usage=usage,
            error=error if isinstance(error, Mapping) else None,
        )
