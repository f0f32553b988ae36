"""Token estimates, usage parsing and the stream token counter."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.tokens import (
    TOKENS_IMAGE_HIGH,
    TOKENS_IMAGE_LOW,
    TOKENS_PER_MESSAGE,
    TOKENS_REPLY_PRIMING,
    ChunkInfo,
    Endpoint,
    MalformedChunk,
    StreamTokenCounter,
    Usage,
    estimate_prompt_tokens,
    estimate_text_tokens,
    is_usage_only,
    usage_from_response,
)

# -- estimate_text_tokens -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("a", 1),
        ("abcd", 1),
        ("abcde", 2),
        ("Hello, world!", 4),  # 13 ASCII chars
        ("你好", 2),
        ("你好ab", 3),
        ("é", 1),
        ("😀", 1),
    ],
)
def test_estimate_text_tokens(text: str, tokens: int) -> None:
    assert estimate_text_tokens(text) == tokens


@given(st.text(), st.text())
def test_text_estimate_properties(a: str, b: str) -> None:
    ta, tb, tab = estimate_text_tokens(a), estimate_text_tokens(b), estimate_text_tokens(a + b)
    assert (ta == 0) == (a == "")
    assert ta <= len(a)
    assert max(ta, tb) <= tab <= ta + tb  # concatenation can only save the rounding


# -- estimate_prompt_tokens -----------------------------------------------------------------


def test_chat_prompt() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "abcdefgh"},  # 2
            {"role": "user", "content": "你好", "name": "bob"},  # 2 + name 1 + 1
        ],
    }
    expected = TOKENS_REPLY_PRIMING + 2 * TOKENS_PER_MESSAGE + 2 + 2 + 2
    assert estimate_prompt_tokens(body, "chat") == expected
    assert estimate_prompt_tokens(body, "/v1/chat/completions") == expected
    assert estimate_prompt_tokens(body, Endpoint.CHAT) == expected


def test_chat_content_parts() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "abcd"},  # 1
                    {"type": "image_url", "image_url": {"url": "x", "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": "x"}},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                    "not a part",  # tolerated: counted as text (3)
                    42,  # ignored
                ],
            }
        ]
    }
    expected = TOKENS_REPLY_PRIMING + TOKENS_PER_MESSAGE + 1 + TOKENS_IMAGE_LOW
    expected += TOKENS_IMAGE_HIGH + 3
    assert estimate_prompt_tokens(body, "chat") == expected


def test_chat_tools_and_tool_calls_count() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    call = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    base = {"messages": [{"role": "assistant", "content": None}]}
    with_tools = {**base, "tools": tools}
    with_calls = {"messages": [{"role": "assistant", "content": None, "tool_calls": call}]}
    plain = estimate_prompt_tokens(base, "chat")
    assert plain == TOKENS_REPLY_PRIMING + TOKENS_PER_MESSAGE
    assert estimate_prompt_tokens(with_tools, "chat") == plain + estimate_text_tokens(
        orjson.dumps(tools).decode()
    )
    assert estimate_prompt_tokens(with_calls, "chat") == plain + estimate_text_tokens(
        orjson.dumps(call).decode()
    )


@pytest.mark.parametrize(
    "body",
    [{}, {"messages": "hi"}, {"messages": [None, 3, "x"]}, {"messages": [{"content": 5}]}],
)
def test_chat_tolerates_malformed_bodies(body: dict[str, Any]) -> None:
    assert estimate_prompt_tokens(body, "chat") >= 0


@pytest.mark.parametrize(
    ("prompt", "tokens"),
    [
        ("abcdefgh", 2),
        (["abcd", "你好"], 3),
        ([1, 2, 3], 3),
        ([[1, 2], [3, 4, 5]], 5),
        (None, 0),
        ({"x": 1}, 0),
    ],
)
def test_completions_and_embeddings(prompt: Any, tokens: int) -> None:
    assert estimate_prompt_tokens({"prompt": prompt}, "completions") == tokens
    assert estimate_prompt_tokens({"prompt": prompt}, "/v1/completions") == tokens
    assert estimate_prompt_tokens({"input": prompt}, "embeddings") == tokens
    assert estimate_prompt_tokens({"input": prompt}, "/v1/embeddings") == tokens


def test_unknown_endpoint() -> None:
    with pytest.raises(ValueError, match="unknown endpoint"):
        estimate_prompt_tokens({}, "/v1/images/generations")


# -- usage ----------------------------------------------------------------------------------


def test_usage_from_response() -> None:
    body = {
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 20,
            "total_tokens": 120,
            "prompt_tokens_details": {"cached_tokens": 64},
        }
    }
    usage = usage_from_response(body)
    assert usage == Usage(prompt_tokens=100, cached_tokens=64, completion_tokens=20)
    assert usage is not None
    assert usage.total == 120


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (None, None),
        ({}, None),
        ("x", None),
        ({"prompt_tokens": 8, "total_tokens": 8}, Usage(8, 0, 0)),  # embeddings
        ({"prompt_tokens": 5, "completion_tokens": None}, Usage(5, 0, 0)),
        ({"prompt_tokens": -1, "completion_tokens": 2}, None),
        ({"prompt_tokens": True, "completion_tokens": 2}, None),
        ({"prompt_tokens": "5", "completion_tokens": 2}, None),
        ({"prompt_tokens": 5, "completion_tokens": 2.0}, None),
        (
            {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": None},
            Usage(5, 0, 2),
        ),
        (
            {
                "prompt_tokens": 5,
                "completion_tokens": 2,
                "prompt_tokens_details": {"cached_tokens": 9},
            },
            Usage(5, 5, 2),  # cached is clipped to the prompt
        ),
        (
            {"prompt_tokens": 50, "completion_tokens": 2, "prompt_cache_hit_tokens": 32},
            Usage(50, 32, 2),
        ),
    ],
)
def test_usage_variants(usage: Any, expected: Usage | None) -> None:
    assert usage_from_response({"usage": usage}) == expected


# -- StreamTokenCounter ---------------------------------------------------------------------


def _chunk(**fields: Any) -> bytes:
    return orjson.dumps({"id": "x", "object": "chat.completion.chunk", **fields})


def _delta(**delta: Any) -> bytes:
    return _chunk(choices=[{"index": 0, "delta": delta, "finish_reason": None}])


def test_stream_counts_content_and_usage() -> None:
    counter = StreamTokenCounter()
    assert counter.feed(_delta(role="assistant", content="")) == ChunkInfo()
    assert counter.feed(_delta(content="Hello")) == ChunkInfo()
    assert counter.feed(_delta(content=" world, how are you?")) == ChunkInfo()
    # 25 ASCII chars -> 7, more than the 2 pieces
    assert counter.completion_tokens_estimate == 7
    usage_chunk = _chunk(
        choices=[],
        usage={
            "prompt_tokens": 9,
            "completion_tokens": 6,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    )
    info = counter.feed(usage_chunk)
    assert info == ChunkInfo(usage_only=True, usage=Usage(9, 0, 6))
    assert counter.upstream_usage == Usage(9, 0, 6)
    assert counter.feed(b"[DONE]") == ChunkInfo(done=True)
    assert counter.done


def test_stream_counts_reasoning_tool_calls_and_refusals() -> None:
    counter = StreamTokenCounter()
    counter.feed(_delta(reasoning_content="你好"))  # 2
    call = {"index": 0, "id": "c", "function": {"name": "get", "arguments": ""}}
    counter.feed(_delta(tool_calls=[call]))  # "get": 3 ASCII
    counter.feed(_delta(tool_calls=[{"index": 0, "function": {"arguments": '{"a":'}}]))  # 5
    counter.feed(_delta(tool_calls=[{"index": 0, "function": {"arguments": "1}"}}]))  # 2
    counter.feed(_delta(refusal="no"))  # 2
    # ASCII 3 + 5 + 2 + 2 = 12 -> 3 tokens, plus 2 CJK = 5; 5 non-empty pieces -> 5
    assert counter.completion_tokens_estimate == 5
    counter.feed(_delta(content="x"))
    assert counter.completion_tokens_estimate == 6  # pieces now dominate


def test_stream_counts_legacy_completions_text() -> None:
    counter = StreamTokenCounter()
    counter.feed(orjson.dumps({"choices": [{"index": 0, "text": "abcdefgh"}]}))
    counter.feed(orjson.dumps({"choices": [{"index": 0, "text": "ijkl", "finish_reason": "stop"}]}))
    assert counter.completion_tokens_estimate == 3


def test_usage_on_every_chunk_keeps_the_last() -> None:
    counter = StreamTokenCounter()
    counter.feed(_chunk(choices=[], usage=None))
    assert counter.upstream_usage is None
    info = counter.feed(
        _chunk(
            choices=[{"index": 0, "delta": {"content": "a"}}],
            usage={"prompt_tokens": 3, "completion_tokens": 1},
        )
    )
    assert info == ChunkInfo(usage=Usage(3, 0, 1))  # has choices: not usage-only
    counter.feed(_chunk(choices=[], usage={"prompt_tokens": 3, "completion_tokens": 2}))
    assert counter.upstream_usage == Usage(3, 0, 2)


def test_error_inside_the_stream_is_reported() -> None:
    counter = StreamTokenCounter()
    error = {"message": "overloaded", "type": "server_error"}
    assert counter.feed(orjson.dumps({"error": error})) == ChunkInfo(error=error)


@pytest.mark.parametrize(
    "payload", [b"", b"{", b"not json", b"[1, 2]", b'"text"', b"null", b"\xff\xfe"]
)
def test_malformed_chunks_raise(payload: bytes) -> None:
    with pytest.raises(MalformedChunk):
        StreamTokenCounter().feed(payload)


def test_is_usage_only() -> None:
    assert is_usage_only({"choices": [], "usage": {"prompt_tokens": 1}})
    assert not is_usage_only({"choices": [], "usage": None})
    assert not is_usage_only({"choices": [{}], "usage": {"prompt_tokens": 1}})
    assert not is_usage_only({"usage": {"prompt_tokens": 1}})


@given(st.lists(st.text(min_size=1, max_size=20), max_size=30))
def test_stream_estimate_bounds(pieces: list[str]) -> None:
    counter = StreamTokenCounter()
    for piece in pieces:
        counter.feed(_delta(content=piece))
    whole = estimate_text_tokens("".join(pieces))
    assert counter.completion_tokens_estimate == max(whole, len(pieces))
