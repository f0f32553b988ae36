"""The mock upstream, served for real on 127.0.0.1:0 and spoken to over loopback."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import httpx
import orjson
import pytest
import trio

from loadtest.bench.native_mock import receive_once
from loadtest.mock_upstream import MockConfig, MockUpstream, run_mock_upstream

CHUNKS = 5
AUTH = {"Authorization": "Bearer sk-test"}
CHAT = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello there  world"}]},
    ],
}


@pytest.fixture
async def client(nursery: trio.Nursery) -> AsyncIterator[httpx.AsyncClient]:
    config = MockConfig(chunk_count=CHUNKS, embedding_dim=4)
    port = await nursery.start(partial(run_mock_upstream, config, host="127.0.0.1", port=0))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as http:
        yield http


async def sse(response: httpx.Response) -> list[str]:
    """Every ``data:`` payload of a stream, in order."""
    return [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]


async def stream_events(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> list[str]:
    async with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return await sse(response)


async def collect_events(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    into: list[str],
) -> None:
    """Like `stream_events`, but keeps what arrived if the stream fails part way."""
    async with client.stream("POST", path, json=body, headers=headers) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                into.append(line[6:])


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/_mock/stats")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


async def wait_for_stats(client: httpx.AsyncClient, **expected: int) -> dict[str, Any]:
    with trio.fail_after(5):
        while True:
            current = await stats(client)
            if all(current[name] == value for name, value in expected.items()):
                return current
            await trio.sleep(0.01)


def assert_openai_error(response: httpx.Response, status: int, type_: str, code: Any) -> None:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert (error["type"], error["code"]) == (type_, code)


async def test_chat_non_stream_shape_and_token_accounting(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=CHAT)

    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-4o-mini"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "tok " * CHUNKS
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": CHUNKS,
        "total_tokens": 5 + CHUNKS,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def test_prompt_tokens_are_at_least_one(client: httpx.AsyncClient) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "   "}]}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.json()["usage"]["prompt_tokens"] == 1


async def test_chat_stream_without_usage(client: httpx.AsyncClient) -> None:
    events = await stream_events(client, "/v1/chat/completions", {**CHAT, "stream": True})

    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["model"] == "gpt-4o-mini" for c in chunks)
    assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert content == ["tok "] * CHUNKS
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_stream_with_usage(client: httpx.AsyncClient) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    events = await stream_events(client, "/v1/chat/completions", body)

    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 5
    assert usage_chunk["usage"]["completion_tokens"] == CHUNKS
    assert usage_chunk["usage"]["total_tokens"] == 5 + CHUNKS
    assert usage_chunk["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in chunks[:-1])
    content_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content_chunks) == CHUNKS


@pytest.mark.parametrize("limit_field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_truncates_with_length(
    client: httpx.AsyncClient, limit_field: str
) -> None:
    body = {**CHAT, limit_field: 2}
    response = await client.post("/v1/chat/completions", json=body)
    choice = response.json()["choices"][0]
    assert choice == {**choice, "finish_reason": "length"}
    assert choice["message"]["content"] == "tok tok "
    assert response.json()["usage"]["completion_tokens"] == 2

    events = await stream_events(client, "/v1/chat/completions", {**body, "stream": True})
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert len(chunks) == 1 + 2 + 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_max_tokens_not_smaller_than_chunks_is_stop(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": CHUNKS})
    assert response.json()["choices"][0]["finish_reason"] == "stop"


async def test_completions_non_stream(client: httpx.AsyncClient) -> None:
    body = {"model": "deepseek-v4-flash", "prompt": "once upon a time"}
    response = await client.post("/v1/completions", json=body)

    assert response.status_code == 200
    data = response.json()
    assert data["id"].startswith("cmpl-")
    assert data["object"] == "text_completion"
    assert data["model"] == "deepseek-v4-flash"
    assert data["choices"][0]["text"] == "tok " * CHUNKS
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["prompt_tokens"] == 4
    assert data["usage"]["completion_tokens"] == CHUNKS

    tokens_and_text = {"model": "m", "prompt": ["a b", [1, 2, 3]]}
    response = await client.post("/v1/completions", json=tokens_and_text)
    assert response.json()["usage"]["prompt_tokens"] == 5


async def test_completions_stream(client: httpx.AsyncClient) -> None:
    body = {
        "model": "deepseek-v4-flash",
        "prompt": "once upon a time",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = await stream_events(client, "/v1/completions", body)

    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    texts = [c["choices"][0]["text"] for c in chunks[:-2]]
    assert texts == ["tok "] * CHUNKS
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == 4


async def test_embeddings_are_deterministic(client: httpx.AsyncClient) -> None:
    body = {"model": "text-embedding-3-small", "input": ["a b c", "d", "a b c"]}
    first = (await client.post("/v1/embeddings", json=body)).json()
    second = (await client.post("/v1/embeddings", json=body)).json()

    assert first == second
    assert first["object"] == "list"
    assert first["model"] == "text-embedding-3-small"
    assert [d["index"] for d in first["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in first["data"])
    vectors = [d["embedding"] for d in first["data"]]
    assert all(len(v) == 4 for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    assert first["usage"] == {"prompt_tokens": 7, "total_tokens": 7}

    single = await client.post("/v1/embeddings", json={**body, "input": "a b c"})
    assert single.json()["data"][0]["embedding"] == vectors[0]
    assert single.json()["usage"]["prompt_tokens"] == 3


async def test_embeddings_base64(client: httpx.AsyncClient) -> None:
    body = {"model": "text-embedding-3-small", "input": "a b c"}
    floats = (await client.post("/v1/embeddings", json=body)).json()["data"][0]["embedding"]
    encoded = await client.post("/v1/embeddings", json={**body, "encoding_format": "base64"})
    decoded = struct.unpack("<4f", base64.b64decode(encoded.json()["data"][0]["embedding"]))
    assert decoded == pytest.approx(floats, rel=1e-6)


async def test_models(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [
        "gpt-4o-mini",
        "deepseek-v4-flash",
        "text-embedding-3-small",
    ]
    assert all(m["object"] == "model" for m in body["data"])


async def test_mock_override_shapes_one_request(client: httpx.AsyncClient) -> None:
    override = {"chunks": 3, "ttft_ms": 10, "chunk_delay_ms": 5}
    body = {**CHAT, "stream": True, "mock": override}
    events = await stream_events(client, "/v1/chat/completions", body)
    content = [orjson.loads(e)["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert content == ["tok "] * 3

    response = await client.post("/v1/chat/completions", json={**CHAT, "mock": override})
    assert response.json()["usage"]["completion_tokens"] == 3
    assert (await client.post("/v1/chat/completions", json=CHAT)).json()["usage"][
        "completion_tokens"
    ] == CHUNKS


async def test_bad_mock_override_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, "mock": {"chunks": -1}})
    assert_openai_error(response, 400, "invalid_request_error", None)


async def test_missing_key_is_401(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": ""})
    assert_openai_error(response, 401, "invalid_request_error", None)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]"])
async def test_malformed_body_is_400(client: httpx.AsyncClient, content: bytes) -> None:
    response = await client.post("/v1/chat/completions", content=content)
    assert_openai_error(response, 400, "invalid_request_error", None)


async def test_unknown_route_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/nope", json={})
    assert_openai_error(response, 404, "invalid_request_error", "unknown_url")


@pytest.mark.parametrize(
    ("key", "status", "type_", "code"),
    [
        ("mock-500", 500, "server_error", None),
        ("mock-429-a", 429, "requests", "rate_limit_exceeded"),
        ("mock-quota", 429, "insufficient_quota", "insufficient_quota"),
        ("mock-401-b", 401, "invalid_request_error", "invalid_api_key"),
    ],
)
async def test_error_fault_modes(
    client: httpx.AsyncClient, key: str, status: int, type_: str, code: str | None
) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)

    assert_openai_error(response, status, type_, code)
    assert ("retry-after" in response.headers) == (key.startswith("mock-429"))
    if key.startswith("mock-429"):
        assert response.headers["retry-after"] == "2"
    assert key not in response.text


async def test_unknown_mode_key_is_healthy(client: httpx.AsyncClient) -> None:
    headers = {"Authorization": "Bearer mock-sparkly-1"}
    response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 200


async def test_cut_stream_ends_without_done(client: httpx.AsyncClient) -> None:
    headers = {"Authorization": "Bearer mock-cut"}
    events: list[str] = []
    body = {**CHAT, "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):
        await collect_events(client, "/v1/chat/completions", body, headers, events)

    assert "[DONE]" not in events
    assert len(events) == 1 + CHUNKS // 2
    current = await stats(client)
    assert (current["completed_streams"], current["disconnected_streams"]) == (0, 0)


async def test_cut_non_stream_closes_without_body(client: httpx.AsyncClient) -> None:
    headers = {"Authorization": "Bearer mock-cut"}
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/v1/chat/completions", json=CHAT, headers=headers)


async def test_malformed_stream_has_a_non_json_event(client: httpx.AsyncClient) -> None:
    headers = {"Authorization": "Bearer mock-malformed"}
    async with client.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    ) as response:
        events = await sse(response)

    bad = []
    for index, event in enumerate(events[:-1]):
        try:
            orjson.loads(event)
        except orjson.JSONDecodeError:
            bad.append(index)
    assert bad == [1 + CHUNKS // 2]
    assert events[-1] == "[DONE]"


async def test_malformed_non_stream_is_not_json(client: httpx.AsyncClient) -> None:
    headers = {"Authorization": "Bearer mock-malformed"}
    response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status_code == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(response.content)


async def test_hang_until_client_leaves(client: httpx.AsyncClient) -> None:
    headers = {"Authorization": "Bearer mock-hang-1"}
    async with trio.open_nursery() as nursery:

        async def caller() -> None:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/chat/completions", json=CHAT, headers=headers, timeout=0.2)

        nursery.start_soon(caller)
        await wait_for_stats(client, active_streams=1)

    current = await wait_for_stats(client, active_streams=0, disconnected_streams=1)
    assert current["requests"]["mock-hang-1"] == 1


async def test_slow_stream_abandoned_counts_as_disconnected(client: httpx.AsyncClient) -> None:
    headers = {"Authorization": "Bearer mock-slow"}
    events: list[str] = []
    with trio.move_on_after(0.3):
        await collect_events(
            client, "/v1/chat/completions", {**CHAT, "stream": True}, headers, events
        )

    # Only the role chunk precedes the two-second time to first token.
    assert len(events) == 1
    await wait_for_stats(client, active_streams=0, disconnected_streams=1, completed_streams=0)


async def test_client_leaving_mid_stream_is_counted(client: httpx.AsyncClient) -> None:
    body = {**CHAT, "stream": True, "mock": {"chunks": 1000, "chunk_delay_ms": 5}}
    seen = 0
    # Leave by cancelling rather than `break`: the cancellation unwinds httpx's nested
    # async generators, which a `break` would leave for the garbage collector.
    with trio.CancelScope() as leave:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    leave.cancel()
    assert seen == 3

    await wait_for_stats(client, active_streams=0, disconnected_streams=1, completed_streams=0)


async def test_stats_count_requests_per_key_and_reset(client: httpx.AsyncClient) -> None:
    await client.post("/v1/chat/completions", json=CHAT)
    await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    await client.get("/v1/models", headers={"Authorization": "Bearer mock-500"})

    current = await stats(client)
    assert current == {
        "requests": {"sk-test": 2, "mock-500": 1},
        "active_streams": 0,
        "completed_streams": 1,
        "disconnected_streams": 0,
    }

    assert (await client.post("/_mock/reset")).status_code == 200
    assert await stats(client) == {
        "requests": {},
        "active_streams": 0,
        "completed_streams": 0,
        "disconnected_streams": 0,
    }


def test_config_rejects_negative_values() -> None:
    with pytest.raises(ValueError, match="chunk_count"):
        MockConfig(chunk_count=-1)


async def test_stream_keeps_its_schedule_when_a_send_is_late(autojump_clock: Any) -> None:
    """Each event is due at ttft + i * delay from the start: a send that takes 25 ms makes
    the next events late but does not push the rest of the stream back."""
    app = MockUpstream(MockConfig())
    body = orjson.dumps({**CHAT, "stream": True,
                         "mock": {"chunks": 6, "ttft_ms": 50, "chunk_delay_ms": 10}})
    start = trio.current_time()
    sent: list[float] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(round((trio.current_time() - start) * 1000))
            if len(sent) == 3:
                await trio.sleep(0.025)  # a slow write

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"authorization", b"Bearer sk-test")]}
    await app(scope, receive_once(body), send)
    # role at 0; pieces due at 50, 60, ..., 100; the third write ends at 85 ms.
    assert sent == [0, 50, 60, 85, 85, 90, 100]
