"""The admin CSV exports over real HTTP: one row per database row, streamed; cells a
spreadsheet would run as formulas are neutralised; upstream secrets never leave."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator

import httpx
import pytest

from store.usage import UsageRecord, write_usage
from tests.e2e.conftest import Harness
from tests.e2e.test_api_admin_users import admin_login, api_error
from tests.e2e.test_api_payment import buy
from tests.e2e.test_api_shop import bearer, register

SECRET = "mock-healthy-export-secret-0123456789"
CHAT = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "hi there"}]}
HEADERS = {
    "users.csv": ["id", "email", "role", "status", "plan", "token_limit", "token_used",
                  "request_count", "balance_fen", "rebate_fen", "invited_by", "expires_at",
                  "created_at"],
    "orders.csv": ["id", "user_id", "plan_id", "amount_fen", "payment_method", "status",
                   "transaction_id", "created_at", "expires_at", "paid_at"],
    "usage.csv": ["request_id", "user_id", "api_key_id", "upstream_key_id", "model",
                  "endpoint", "prompt_tokens", "cached_tokens", "completion_tokens",
                  "cost_micro", "latency_ms", "ttft_ms", "status", "usage_source",
                  "created_at"],
    "upstream_keys.csv": ["id", "name", "base_url", "api_key", "models", "weight", "priority",
                          "rpm", "tpm", "max_concurrency", "status", "disabled_reason",
                          "updated_at"],
}
TABLES = {"users.csv": "users", "orders.csv": "orders", "usage.csv": "usage_records",
          "upstream_keys.csv": "upstream_keys"}


@pytest.fixture
async def api(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=30.0) as client:
        yield client


@pytest.fixture
async def admin(api: httpx.AsyncClient) -> dict[str, str]:
    return await admin_login(api)


async def download(
    api: httpx.AsyncClient, admin: dict[str, str], name: str
) -> tuple[httpx.Response, list[dict[str, str]]]:
    response = await api.get(f"/api/export/{name}", headers=admin)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert name in response.headers["content-disposition"]
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows[0] == HEADERS[name]
    return response, [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]


async def some_activity(h: Harness, api: httpx.AsyncClient) -> None:
    """Users, orders, upstream keys and usage rows to export."""
    await h.add_key(SECRET, name="primary", priority=-3)
    _, token = await register(api, "exported@airgate.test")
    await buy(api, token)
    await buy(api, token, "pro_monthly")
    user_id, sk = await h.add_user()
    for _ in range(3):
        chat = await api.post("/v1/chat/completions", headers=bearer(sk), json=CHAT)
        assert chat.status_code == 200, chat.text
    await h.wait_for_usage(user_id, 3)


@pytest.mark.parametrize("name", list(HEADERS))
async def test_each_export_has_a_header_and_one_row_per_database_row(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str], name: str
) -> None:
    await some_activity(harness, api)
    _, rows = await download(api, admin, name)
    key = HEADERS[name][0]
    ids = await harness.gw.db.fetch(f"SELECT {key} FROM {TABLES[name]}")
    assert sorted(r[key] for r in rows) == sorted(str(i[key]) for i in ids)
    assert rows


async def test_rows_carry_the_database_values(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    await some_activity(harness, api)
    _, users = await download(api, admin, "users.csv")
    _, orders = await download(api, admin, "orders.csv")
    _, usage = await download(api, admin, "usage.csv")
    _, keys = await download(api, admin, "upstream_keys.csv")
    buyer = next(u for u in users if u["email"] == "exported@airgate.test")
    assert (buyer["role"], buyer["status"], buyer["token_limit"], buyer["plan"]) == \
        ("user", "active", "0", "")
    assert "password" not in "".join(HEADERS["users.csv"])
    assert sorted((o["plan_id"], o["amount_fen"], o["status"]) for o in orders) == [
        ("pro_monthly", "9900", "pending"), ("starter_monthly", "2900", "pending")]
    assert {o["user_id"] for o in orders} == {buyer["id"]}
    assert all(u["model"] == "deepseek-v4-flash" and u["status"] == "200" for u in usage)
    assert all(int(u["prompt_tokens"]) == 2 for u in usage)
    (key,) = keys
    assert (key["name"], key["priority"], key["status"]) == ("primary", "-3", "active")
    assert key["models"] == "deepseek-v4-flash gpt-4o-mini text-embedding-3-small"


async def test_formula_cells_are_neutralised(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    names = ['=HYPERLINK("http://evil.test","click")', "+1+cmd|' /C calc'!A0", "-1-2",
             "@SUM(A1:A2)", "\t=1", "\r=1", "plain =not-a-formula"]
    for i, name in enumerate(names):
        await harness.add_key(f"mock-healthy-{i}-abcdefghijkl", name=name)
    emails = ["=1+2@evil.test", "+cmd@evil.test", "-x@evil.test"]
    for email in emails:
        await register(api, email)
    _, keys = await download(api, admin, "upstream_keys.csv")
    assert sorted(k["name"] for k in keys) == sorted(
        n if n.startswith("plain") else "'" + n for n in names)
    _, users = await download(api, admin, "users.csv")
    exported = {u["email"] for u in users}
    assert {"'" + e for e in emails} <= exported
    for row in [*keys, *users]:
        for cell in row.values():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell


async def test_upstream_secrets_never_appear_in_the_export(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    short = "mock-short"
    await harness.add_key(SECRET, name="long")
    await harness.add_key(short, name="short")
    response, keys = await download(api, admin, "upstream_keys.csv")
    assert SECRET not in response.text
    assert short not in response.text
    masked = {k["name"]: k["api_key"] for k in keys}
    assert masked["long"] == SECRET[:3] + "****" + SECRET[-4:]
    assert masked["short"] == "****"


async def test_a_large_usage_export_streams_every_row(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    user_id, _ = await harness.add_user()
    records = [
        UsageRecord(request_id=f"req-{i:05d}", user_id=user_id, api_key_id=None,
                    upstream_key_id=None, model="gpt-4o-mini", endpoint="chat",
                    prompt_tokens=i, cached_tokens=0, completion_tokens=1, cost_micro=i,
                    latency_ms=5, ttft_ms=None, status=200, usage_source="upstream")
        for i in range(3000)
    ]
    assert await write_usage(harness.gw.db, records) == 3000
    async with api.stream("GET", "/api/export/usage.csv", headers=admin) as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers  # streamed, not built in memory
        body = b"".join([chunk async for chunk in response.aiter_bytes()])
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert len(rows) == 3000
    assert [r["request_id"] for r in rows] == [f"req-{i:05d}" for i in range(3000)]
    assert sum(int(r["prompt_tokens"]) for r in rows) == sum(range(3000))


async def test_an_empty_table_exports_only_the_header(
    api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    for name in ("orders.csv", "usage.csv", "upstream_keys.csv"):
        _, rows = await download(api, admin, name)
        assert rows == []


async def test_exports_need_an_admin(api: httpx.AsyncClient) -> None:
    _, token = await register(api, "snoop@airgate.test")
    for name in HEADERS:
        api_error(await api.get(f"/api/export/{name}", headers=bearer(token)), 403)
        api_error(await api.get(f"/api/export/{name}"), 401)
