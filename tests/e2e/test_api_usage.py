"""A user's view of their own usage over real HTTP, after real /v1 traffic through the
official openai SDK: /api/usage/stats, /api/usage/log, /api/export/self, /api/models."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Harness, in_thread
from tests.e2e.test_api_admin_users import api_error
from tests.e2e.test_api_shop import bearer, grant_balance, register

CHAT = [{"role": "user", "content": "say hello to the gateway"}]  # 5 prompt tokens


@pytest.fixture
async def api(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=20.0) as client:
        yield client


async def customer(h: Harness, api: httpx.AsyncClient, email: str) -> tuple[str, str, str]:
    """A user on the starter plan (bought with balance) with an sk- key: (id, jwt, sk)."""
    user_id, token = await register(api, email)
    await grant_balance(h.gw.db, user_id, 2900, f"grant-{email}")
    order = await api.post("/api/orders/create", headers=bearer(token),
                           json={"planId": "starter_monthly", "paymentMethod": "balance"})
    assert order.status_code == 201, order.text
    created = await api.post("/api/auth/apikey", headers=bearer(token))
    assert created.status_code == 200, created.text
    return user_id, token, created.json()["api_key"]


async def traffic(h: Harness, user_id: str, sk: str) -> list[dict[str, Any]]:
    """Three requests through the SDK, each flushed before the next: a chat, a streamed
    chat and a legacy completion. Returns the usage rows, oldest first."""
    client = h.client(sk)
    await in_thread(client.chat.completions.create, model="deepseek-v4-flash", messages=CHAT)
    await h.wait_for_usage(user_id, 1)

    def stream() -> None:
        for _ in client.chat.completions.create(model="gpt-4o-mini", messages=CHAT,
                                                stream=True,
                                                stream_options={"include_usage": True}):
            pass

    await in_thread(stream)
    await h.wait_for_usage(user_id, 2)
    await in_thread(client.completions.create, model="deepseek-v4-flash",
                    prompt="one two three", max_tokens=4)
    return await h.wait_for_usage(user_id, 3)


async def test_usage_stats_follow_real_requests_in_the_seed_shape(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    await harness.add_key()
    user_id, token, sk = await customer(harness, api, "stats@airgate.test")
    before = (await api.get("/api/usage/stats", headers=bearer(token))).json()
    assert set(before) == {"tokenUsed", "tokenLimit", "remaining", "requestCount", "plan",
                           "expiresAt"}
    assert (before["tokenUsed"], before["requestCount"], before["remaining"]) == \
        (0, 0, 5_000_000)
    rows = await traffic(harness, user_id, sk)
    used = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    assert used == (5 + 20) + (5 + 20) + (3 + 4)
    stats = (await api.get("/api/usage/stats", headers=bearer(token))).json()
    assert stats == {"tokenUsed": used, "tokenLimit": 5_000_000,
                     "remaining": 5_000_000 - used, "requestCount": 3,
                     "plan": "starter_monthly", "expiresAt": before["expiresAt"]}
    assert isinstance(stats["expiresAt"], int)
    me = (await api.get("/api/auth/me", headers=bearer(token))).json()["user"]
    assert (me["tokenUsed"], me["tokenLimit"]) == (used, 5_000_000)


async def test_the_usage_log_is_newest_first_paged_and_private(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    await harness.add_key()
    user_id, token, sk = await customer(harness, api, "log@airgate.test")
    other_id, other_token, other_sk = await customer(harness, api, "other@airgate.test")
    rows = await traffic(harness, user_id, sk)
    other = harness.client(other_sk)
    await in_thread(other.chat.completions.create, model="gpt-4o-mini", messages=CHAT)
    (other_row,) = await harness.wait_for_usage(other_id, 1)

    log = await api.get("/api/usage/log", headers=bearer(token))
    assert log.status_code == 200, log.text
    body = log.json()
    assert (body["page"], body["limit"], body["total"]) == (1, 50, 3)
    entries = body["logs"]
    assert [e["id"] for e in entries] == [r["request_id"] for r in reversed(rows)]
    newest = entries[0]
    assert set(newest) >= {"time", "model", "prompt_tokens", "completion_tokens",
                           "cached_tokens", "cost", "latency_ms", "status"}
    assert (newest["model"], newest["endpoint"], newest["prompt_tokens"],
            newest["completion_tokens"], newest["cached_tokens"], newest["status"]) == \
        ("deepseek-v4-flash", "completions", 3, 4, 0, 200)
    assert [e["model"] for e in entries] == ["deepseek-v4-flash", "gpt-4o-mini",
                                             "deepseek-v4-flash"]
    times = [e["time"] for e in entries]
    assert times == sorted(times, reverse=True)
    for entry, row in zip(entries, reversed(rows), strict=True):
        assert entry["cost_micro"] == row["cost_micro"] > 0
        assert entry["cost"] == row["cost_micro"] / 1_000_000
        assert entry["latency_ms"] == row["latency_ms"] >= 0
        assert entry["time"] == int(row["created_at"].timestamp())

    second = (await api.get("/api/usage/log", headers=bearer(token),
                            params={"page": 2, "limit": 1})).json()
    assert [e["id"] for e in second["logs"]] == [entries[1]["id"]]
    assert second["total"] == 3
    beyond = (await api.get("/api/usage/log", headers=bearer(token),
                            params={"page": 9, "limit": 2})).json()
    assert beyond["logs"] == []
    others = (await api.get("/api/usage/log", headers=bearer(other_token))).json()
    assert [e["id"] for e in others["logs"]] == [other_row["request_id"]]
    assert others["total"] == 1


@pytest.mark.parametrize("params", [
    {"page": "0"}, {"page": "-2"}, {"page": "one"}, {"limit": "0"}, {"limit": "501"},
    {"limit": ""},
])
async def test_the_usage_log_refuses_bad_paging(
    api: httpx.AsyncClient, params: dict[str, str]
) -> None:
    _, token = await register(api, "pager@airgate.test")
    api_error(await api.get("/api/usage/log", headers=bearer(token), params=params), 400)


async def test_self_export_holds_usage_logs_and_orders(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    await harness.add_key()
    user_id, token, sk = await customer(harness, api, "export@airgate.test")
    pending = await api.post("/api/orders/create", headers=bearer(token),
                             json={"planId": "pro_monthly", "paymentMethod": "wxpay"})
    assert pending.status_code == 201, pending.text
    rows = await traffic(harness, user_id, sk)
    response = await api.get("/api/export/self", headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    data = response.json()
    used = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    assert data["user"]["id"] == user_id
    assert data["user"]["email"] == "export@airgate.test"
    assert data["usage"] == {"tokenUsed": used, "tokenLimit": 5_000_000, "requestCount": 3,
                             "balance": 0.0, "balance_fen": 0}
    assert data["logs_total"] == 3
    assert [e["id"] for e in data["logs"]] == [r["request_id"] for r in reversed(rows)]
    assert sorted((o["planId"], o["status"], o["paymentMethod"]) for o in data["orders"]) \
        == [("pro_monthly", "pending", "wxpay"), ("starter_monthly", "paid", "balance")]
    assert "password" not in response.text
    assert sk not in response.text


async def test_account_usage_routes_need_a_session(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    _, sk = await harness.add_user()
    for path in ("/api/usage/stats", "/api/usage/log", "/api/export/self"):
        api_error(await api.get(path), 401)
        api_error(await api.get(path, headers=bearer(sk)), 401)  # an sk- key is no session
        api_error(await api.get(path, headers=bearer("not-a-jwt")), 401)


async def test_the_model_list_has_the_seed_shape(api: httpx.AsyncClient) -> None:
    response = await api.get("/api/models")
    assert response.status_code == 200, response.text
    models = response.json()["models"]
    assert models[0] == {"id": "deepseek-v4-flash", "display_name": "DeepSeek V4 Flash",
                         "group": "DeepSeek", "status": "active", "input_price": 0.5,
                         "output_price": 2.0, "cached_price": 0.25, "tags": ["DeepSeek"]}
    assert {m["id"] for m in models} == {"deepseek-v4-flash", "gpt-4o-mini",
                                         "text-embedding-3-small"}
    for model in models:
        assert set(model) == {"id", "display_name", "group", "status", "input_price",
                              "output_price", "cached_price", "tags"}
        assert isinstance(model["tags"], list)
