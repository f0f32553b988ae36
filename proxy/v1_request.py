"""Parsing and validating /v1 request bodies. Pure: bytes in, ``ParsedRequest`` out.

Validates only what the gateway relies on (model, stream, token limits, the endpoint's
required input); every other field passes through to the upstream untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from workers.errors import InvalidRequest

# public route -> (endpoint kind, path appended to the upstream key's base_url)
ROUTES: dict[str, tuple[str, str]] = {
    "/v1/chat/completions": ("chat", "/chat/completions"),
    "/v1/completions": ("completions", "/completions"),
    "/v1/embeddings": ("embeddings", "/embeddings"),
}

# Reserved against a key's tpm when the request names no max_tokens.
DEFAULT_OUTPUT_RESERVATION = 1024
_REQUIRED = {"chat": "messages", "completions": "prompt", "embeddings": "input"}


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    max_output: int


def _fail(message: str, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, param=param)


def parse_request(raw: bytes, endpoint: str) -> ParsedRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _fail(
            "We could not parse the JSON body of your request. The OpenAI API expects a "
            "JSON payload."
        ) from None
    if not isinstance(body, dict):
        raise _fail("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _fail("you must provide a model parameter", "model")
    required = _REQUIRED[endpoint]
    value = body.get(required)
    if value is None:
        raise _fail(f"Missing required parameter: '{required}'.", required)
    if endpoint == "chat":
        if not isinstance(value, list) or not value:
            raise _fail("'messages' must be a non-empty array.", "messages")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value):
            raise _fail("Each message must be an object with a 'role'.", "messages")
    elif not isinstance(value, str | list) or (isinstance(value, list) and not value):
        raise _fail(f"'{required}' must be a string or a non-empty array.", required)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _fail("'stream' must be a boolean.", "stream")
    if endpoint == "embeddings" and stream:
        raise _fail("Embeddings cannot be streamed.", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _fail("'stream_options' must be an object.", "stream_options")
    include_usage = bool(options and options.get("include_usage") is True)
    max_output = 0 if endpoint == "embeddings" else DEFAULT_OUTPUT_RESERVATION
    for name in ("max_tokens", "max_completion_tokens"):
        limit = body.get(name)
        if limit is None:
            continue
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise _fail(f"'{name}' must be a positive integer.", name)
        max_output = limit
    return ParsedRequest(body, model, stream, include_usage, max_output)
