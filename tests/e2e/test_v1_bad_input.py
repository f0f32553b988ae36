"""Bad input on /v1: each gets OpenAI's error shape and status, never a 500, never a bill."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Harness

CHAT = "/v1/chat/completions"
GOOD = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "hi"}]}


def _post(base: str, key: str | None, **kwargs: Any) -> httpx.Request:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    return httpx.Request("POST", base + CHAT, headers=headers, **kwargs)


CASES: list[tuple[str, dict[str, Any], int, str | None]] = [
    ("malformed json", {"content": b"{not json"}, 400, None),
    ("not an object", {"json": [1, 2]}, 400, None),
    ("missing model", {"json": {"messages": GOOD["messages"]}}, 400, None),
    ("model not a string", {"json": {**GOOD, "model": 7}}, 400, None),
    ("missing messages", {"json": {"model": "deepseek-v4-flash"}}, 400, None),
    ("messages wrong type", {"json": {**GOOD, "messages": "hi"}}, 400, None),
    ("message without role", {"json": {**GOOD, "messages": [{"content": "x"}]}}, 400, None),
    ("stream not bool", {"json": {**GOOD, "stream": "yes"}}, 400, None),
    ("max_tokens negative", {"json": {**GOOD, "max_tokens": -5}}, 400, None),
    ("unknown model", {"json": {**GOOD, "model": "no-such-model"}}, 404, "model_not_found"),
    ("huge body", {"content": b'{"model": "' + b"x" * (5 * 1024 * 1024) + b'"}'}, 413,
     "request_too_large"),
]


@pytest.mark.parametrize(("case", "kwargs", "status", "code"), CASES,
                         ids=[c[0] for c in CASES])
async def test_bad_body_is_refused_in_openai_shape(
    harness: Harness, case: str, kwargs: dict[str, Any], status: int, code: str | None
) -> None:
    await harness.add_key()
    user_id, key = await harness.add_user()
    async with httpx.AsyncClient() as client:
        response = await client.send(_post(harness.base_url, key, **kwargs))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    assert response.headers["x-request-id"].startswith("req_")
    assert await harness.usage_rows(user_id) == []
    assert (await harness.mock_stats())["requests"] == {}


@pytest.mark.parametrize("auth", [None, "Bearer", "Basic abc", "Bearer sk-nope", "Bearer nope"])
async def test_missing_or_bad_key_is_401(harness: Harness, auth: str | None) -> None:
    headers = {} if auth is None else {"authorization": auth}
    async with httpx.AsyncClient() as client:
        response = await client.post(harness.base_url + CHAT, json=GOOD, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


async def test_unknown_route_and_wrong_method(harness: Harness) -> None:
    _, key = await harness.add_user()
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient() as client:
        missing = await client.post(harness.base_url + "/v1/nothing", json={}, headers=headers)
        wrong = await client.get(harness.base_url + CHAT, headers=headers)
    assert missing.status_code == 404
    assert wrong.status_code in (400, 405)
    for response in (missing, wrong):
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
