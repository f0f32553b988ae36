"""Parsing /v1 bodies: what the gateway relies on is validated, the rest passes through."""

from __future__ import annotations

import orjson
import pytest

from proxy.v1_request import DEFAULT_OUTPUT_RESERVATION, parse_request
from workers.errors import InvalidRequest


def test_unknown_fields_pass_through_untouched() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}],
            "logit_bias": {"50256": -100}, "seed": 7, "tools": [{"type": "function"}]}
    parsed = parse_request(orjson.dumps(body), "chat")
    assert parsed.body == body
    assert parsed.model == "m"
    assert parsed.stream is False
    assert parsed.max_output == DEFAULT_OUTPUT_RESERVATION


def test_stream_options_and_token_limits() -> None:
    body = {"model": "m", "prompt": "x", "stream": True, "max_tokens": 12,
            "stream_options": {"include_usage": True}}
    parsed = parse_request(orjson.dumps(body), "completions")
    assert parsed.stream is True
    assert parsed.include_usage is True
    assert parsed.max_output == 12
    chat = parse_request(orjson.dumps({"model": "m", "messages": [{"role": "user"}],
                                       "max_completion_tokens": 5}), "chat")
    assert chat.max_output == 5


def test_embeddings_reserve_no_output_and_cannot_stream() -> None:
    assert parse_request(b'{"model": "e", "input": ["a"]}', "embeddings").max_output == 0
    with pytest.raises(InvalidRequest, match="cannot be streamed"):
        parse_request(b'{"model": "e", "input": "a", "stream": true}', "embeddings")


@pytest.mark.parametrize(
    ("raw", "endpoint", "param"),
    [
        (b"nope", "chat", None),
        (b"[]", "chat", None),
        (b'{"messages": [{"role": "user"}]}', "chat", "model"),
        (b'{"model": "", "messages": [{"role": "user"}]}', "chat", "model"),
        (b'{"model": "m"}', "chat", "messages"),
        (b'{"model": "m", "messages": []}', "chat", "messages"),
        (b'{"model": "m", "messages": [1]}', "chat", "messages"),
        (b'{"model": "m", "prompt": 5}', "completions", "prompt"),
        (b'{"model": "m", "input": []}', "embeddings", "input"),
        (b'{"model": "m", "prompt": "x", "stream": 1}', "completions", "stream"),
        (b'{"model": "m", "prompt": "x", "max_tokens": 0}', "completions", "max_tokens"),
        (b'{"model": "m", "prompt": "x", "max_tokens": true}', "completions", "max_tokens"),
        (b'{"model": "m", "prompt": "x", "stream_options": 3}', "completions",
         "stream_options"),
    ],
)
def test_bad_bodies_name_the_offending_parameter(
    raw: bytes, endpoint: str, param: str | None
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(raw, endpoint)
    assert caught.value.param == param
    assert caught.value.status == 400
