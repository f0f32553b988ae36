"""Admin user management over real HTTP: list and search, disable/enable with immediate
effect on both credentials, quota and balance adjustments recorded in the ledger, stats."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from store.ledger import ledger_totals
from tests.e2e.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, Harness, eventually
from tests.e2e.test_api_payment import buy, pay
from tests.e2e.test_api_shop import assert_ledger_matches, bearer, register

USERS = "/api/admin/users"
CHAT = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "hi there"}]}


async def admin_login(api: httpx.AsyncClient) -> dict[str, str]:
    """Headers carrying a session of the configured admin."""
    response = await api.post("/api/admin/login",
                              json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert response.status_code == 200, response.text
    return bearer(response.json()["token"])


def api_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["message"]
    assert error["code"]
    return error


@pytest.fixture
async def api(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=20.0) as client:
        yield client


@pytest.fixture
async def admin(api: httpx.AsyncClient) -> dict[str, str]:
    return await admin_login(api)


async def user_with_key(
    h: Harness, api: httpx.AsyncClient, email: str
) -> tuple[str, str, str]:
    """A registered user with token quota and an sk- key: ``(id, jwt, sk)``."""
    user_id, token = await register(api, email)
    await h.gw.db.execute("UPDATE users SET token_limit = 1000000 WHERE id = $1", user_id)
    created = await api.post("/api/auth/apikey", headers=bearer(token))
    assert created.status_code in (200, 201), created.text
    return user_id, token, created.json()["api_key"]


# -- list, search, get ----------------------------------------------------------------------


async def test_list_paginates_newest_first_with_a_total(
    api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    ids = [(await register(api, f"page{i}@airgate.test"))[0] for i in range(5)]
    first = await api.get(USERS, headers=admin, params={"page": 1, "limit": 2})
    second = await api.get(USERS, headers=admin, params={"page": 2, "limit": 2})
    last = await api.get(USERS, headers=admin, params={"page": 4, "limit": 2})
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["page"], body["limit"], body["total"]) == (1, 2, 6)  # five + the admin
    assert [u["id"] for u in body["users"]] == ids[::-1][:2]
    assert [u["id"] for u in second.json()["users"]] == ids[::-1][2:4]
    assert [u["email"] for u in last.json()["users"]] == []
    row = body["users"][0]
    assert set(row) >= {"id", "email", "role", "status", "plan", "tokenLimit", "tokenUsed",
                        "requestCount", "expiresAt", "balance_fen", "rebate_fen",
                        "createdAt"}
    assert "password_hash" not in first.text
    assert "scrypt" not in first.text


async def test_search_matches_an_email_substring_literally(
    api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    for email in ("alice@shop.test", "ALICE2@other.test", "bob@shop.test", "a_b@x.test",
                  "axb@x.test"):
        await register(api, email)

    async def search(term: str) -> list[str]:
        response = await api.get(USERS, headers=admin, params={"search": term})
        assert response.status_code == 200, response.text
        assert response.json()["total"] == len(response.json()["users"])
        return sorted(u["email"] for u in response.json()["users"])

    assert await search("alice") == ["alice2@other.test", "alice@shop.test"]
    assert await search("Alice") == ["alice2@other.test", "alice@shop.test"]
    assert await search("shop.test") == ["alice@shop.test", "bob@shop.test"]
    assert await search("nobody") == []
    assert await search("%") == []
    assert await search("_") == ["a_b@x.test"]  # a literal underscore, not a wildcard
    assert await search("\\") == []
    api_error(await api.get(USERS, headers=admin, params={"search": "a\x00b"}), 400)


@pytest.mark.parametrize("params", [
    {"page": "0"}, {"page": "-1"}, {"page": "x"}, {"limit": "0"}, {"limit": "501"},
    {"limit": "1.5"},
])
async def test_list_refuses_bad_paging_with_400(
    api: httpx.AsyncClient, admin: dict[str, str], params: dict[str, str]
) -> None:
    api_error(await api.get(USERS, headers=admin, params=params), 400)


async def test_admin_routes_refuse_users_and_anonymous_callers(
    api: httpx.AsyncClient,
) -> None:
    user_id, token = await register(api, "plain@airgate.test")
    for method, path in (("GET", USERS), ("GET", f"{USERS}/{user_id}"),
                         ("PATCH", f"{USERS}/{user_id}"), ("GET", "/api/admin/stats"),
                         ("POST", f"{USERS}/{user_id}/disable")):
        api_error(await api.request(method, path, headers=bearer(token), json={}), 403)
        api_error(await api.request(method, path, json={}), 401)


async def test_get_one_user_and_404_for_an_unknown_one(
    api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    user_id, _ = await register(api, "one@airgate.test")
    found = await api.get(f"{USERS}/{user_id}", headers=admin)
    assert found.status_code == 200, found.text
    user = found.json()["user"]
    assert (user["id"], user["email"], user["role"], user["status"]) == \
        (user_id, "one@airgate.test", "user", "active")
    assert (user["tokenLimit"], user["balance_fen"]) == (0, 0)
    api_error(await api.get(f"{USERS}/u_missing", headers=admin), 404)
    api_error(await api.patch(f"{USERS}/u_missing", headers=admin,
                              json={"status": "disabled"}), 404)
    api_error(await api.post(f"{USERS}/u_missing/disable", headers=admin), 404)
    api_error(await api.post(f"{USERS}/u_missing/enable", headers=admin), 404)


# -- disable / enable -----------------------------------------------------------------------


async def _access(api: httpx.AsyncClient, token: str, sk: str) -> tuple[int, httpx.Response]:
    me = await api.get("/api/auth/me", headers=bearer(token))
    chat = await api.post("/v1/chat/completions", headers=bearer(sk), json=CHAT)
    return me.status_code, chat


@pytest.mark.parametrize("how", ["patch", "post"])
async def test_disabling_a_user_cuts_off_jwt_and_key_at_once(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str], how: str
) -> None:
    await harness.add_key()
    user_id, token, sk = await user_with_key(harness, api, "victim@airgate.test")
    me_status, chat = await _access(api, token, sk)
    assert (me_status, chat.status_code) == (200, 200), chat.text  # the key is cached now

    if how == "patch":
        disabled = await api.patch(f"{USERS}/{user_id}", headers=admin,
                                   json={"status": "disabled"})
    else:
        disabled = await api.post(f"{USERS}/{user_id}/disable", headers=admin)
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["user"]["status"] == "disabled"

    me_status, chat = await _access(api, token, sk)
    assert me_status == 403
    assert chat.status_code == 403, chat.text
    error = chat.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "account_disabled"
    assert "x-request-id" in chat.headers
    login = await api.post("/api/auth/login",
                           json={"email": "victim@airgate.test", "password": "password-123"})
    assert login.status_code == 403

    if how == "patch":
        enabled = await api.patch(f"{USERS}/{user_id}", headers=admin,
                                  json={"status": "active"})
    else:
        enabled = await api.post(f"{USERS}/{user_id}/enable", headers=admin)
    assert enabled.status_code == 200, enabled.text
    assert enabled.json()["user"]["status"] == "active"
    me_status, chat = await _access(api, token, sk)
    assert (me_status, chat.status_code) == (200, 200), chat.text
    assert (await harness.mock_stats())["requests"] == {"mock-healthy": 2}


async def test_an_admin_cannot_disable_themself(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    admin_id = await harness.gw.db.fetchval("SELECT id FROM users WHERE email = $1",
                                            ADMIN_EMAIL)
    api_error(await api.patch(f"{USERS}/{admin_id}", headers=admin,
                              json={"status": "disabled", "balance_fen_delta": 100}), 409)
    api_error(await api.post(f"{USERS}/{admin_id}/disable", headers=admin), 409)
    assert await harness.gw.db.fetchval("SELECT status FROM users WHERE id = $1",
                                        admin_id) == "active"
    assert await harness.gw.db.fetchval("SELECT count(*) FROM ledger") == 0
    assert (await api.get(USERS, headers=admin)).status_code == 200


# -- adjustments ----------------------------------------------------------------------------


async def test_adjustments_write_one_ledger_row_each_and_match_the_balance(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    db = harness.gw.db
    user_id, token = await register(api, "adjust@airgate.test")
    path = f"{USERS}/{user_id}"
    grant = await api.patch(path, headers=admin,
                            json={"balance_fen_delta": 1000, "tokenLimit_delta": 5000,
                                  "note": "welcome"})
    assert grant.status_code == 200, grant.text
    assert (grant.json()["user"]["balance_fen"], grant.json()["user"]["tokenLimit"]) == \
        (1000, 5000)
    spend = await api.patch(path, headers=admin, json={"balance_fen_delta": -400})
    assert spend.status_code == 200, spend.text
    assert spend.json()["user"]["balance_fen"] == 600

    overdraw = await api.patch(path, headers=admin, json={"balance_fen_delta": -601})
    api_error(overdraw, 409)
    below_zero_tokens = await api.patch(path, headers=admin, json={"tokenLimit_delta": -5001})
    api_error(below_zero_tokens, 409)

    rows = await db.fetch("SELECT kind, delta_balance_fen, delta_tokens, ref FROM ledger"
                          " WHERE user_id = $1 ORDER BY id", user_id)
    assert [(r["kind"], r["delta_balance_fen"], r["delta_tokens"]) for r in rows] == [
        ("admin_adjust", 1000, 5000), ("admin_adjust", -400, 0)]
    assert rows[0]["ref"] == "welcome"
    await assert_ledger_matches(db, user_id)
    _, _, tokens = await ledger_totals(db, user_id)
    me = (await api.get("/api/auth/me", headers=bearer(token))).json()["user"]
    assert (me["balance_fen"], me["tokenLimit"]) == (600, tokens)


async def test_a_retried_adjustment_with_the_same_idempotency_key_is_a_no_op(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    db = harness.gw.db
    user_id, _ = await register(api, "retry@airgate.test")
    other_id, _ = await register(api, "other@airgate.test")
    headers = {**admin, "Idempotency-Key": "adj-0001"}
    statuses = []
    for _ in range(3):
        response = await api.patch(f"{USERS}/{user_id}", headers=headers,
                                   json={"balance_fen_delta": 250})
        statuses.append(response.status_code)
        assert response.json()["user"]["balance_fen"] == 250
    assert statuses == [200, 200, 200]
    # The same key sent for another user is that user's own adjustment.
    response = await api.patch(f"{USERS}/{other_id}", headers=headers,
                               json={"balance_fen_delta": 70})
    assert response.json()["user"]["balance_fen"] == 70
    fresh = await api.patch(f"{USERS}/{user_id}", headers={**admin, "Idempotency-Key": "adj-2"},
                            json={"balance_fen_delta": 1})
    assert fresh.json()["user"]["balance_fen"] == 251
    assert await db.fetchval("SELECT count(*) FROM ledger WHERE user_id = $1", user_id) == 2
    await assert_ledger_matches(db, user_id)
    await assert_ledger_matches(db, other_id)


async def test_a_failed_overdraw_can_be_retried_later_with_the_same_key(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    user_id, _ = await register(api, "later@airgate.test")
    headers = {**admin, "Idempotency-Key": "take-10"}
    api_error(await api.patch(f"{USERS}/{user_id}", headers=headers,
                              json={"balance_fen_delta": -10}), 409)
    assert await harness.gw.db.fetchval("SELECT count(*) FROM ledger") == 0
    await api.patch(f"{USERS}/{user_id}", headers=admin, json={"balance_fen_delta": 10})
    taken = await api.patch(f"{USERS}/{user_id}", headers=headers,
                            json={"balance_fen_delta": -10})
    assert taken.status_code == 200, taken.text
    assert taken.json()["user"]["balance_fen"] == 0
    await assert_ledger_matches(harness.gw.db, user_id)


async def test_a_token_grant_reaches_the_v1_quota_at_once(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    await harness.add_key()
    user_id, token = await register(api, "quota@airgate.test")
    sk = (await api.post("/api/auth/apikey", headers=bearer(token))).json()["api_key"]
    refused = await api.post("/v1/chat/completions", headers=bearer(sk), json=CHAT)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "insufficient_quota"
    granted = await api.patch(f"{USERS}/{user_id}", headers=admin,
                              json={"tokenLimit_delta": 1000})
    assert granted.status_code == 200, granted.text
    assert granted.json()["user"]["tokenLimit"] == 1000
    again = await api.post("/v1/chat/completions", headers=bearer(sk), json=CHAT)
    assert again.status_code == 200, again.text
    _, _, tokens = await ledger_totals(harness.gw.db, user_id)
    assert tokens == 1000


BAD_CHANGES: list[tuple[str, dict[str, Any]]] = [
    ("status unknown", {"status": "banned"}),
    ("status not a string", {"status": 1}),
    ("balance a string", {"balance_fen_delta": "100"}),
    ("balance a bool", {"balance_fen_delta": True}),
    ("balance a float", {"balance_fen_delta": 1.5}),
    ("balance huge", {"balance_fen_delta": 2**63}),
    ("balance hugely negative", {"balance_fen_delta": -(2**70)}),
    ("tokens a string", {"tokenLimit_delta": "5"}),
    ("tokens a bool", {"tokenLimit_delta": False}),
    ("tokens huge", {"tokenLimit_delta": 10**30}),
    ("note not a string", {"balance_fen_delta": 1, "note": 5}),
    ("note with a NUL", {"balance_fen_delta": 1, "note": "a\x00b"}),
]


@pytest.mark.parametrize(("case", "body"), BAD_CHANGES, ids=[c[0] for c in BAD_CHANGES])
async def test_bad_changes_are_refused_with_400_and_write_nothing(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str], case: str,
    body: dict[str, Any],
) -> None:
    user_id, _ = await register(api, "bad@airgate.test")
    api_error(await api.patch(f"{USERS}/{user_id}", headers=admin, json=body), 400)
    row = await harness.gw.db.fetchrow(
        "SELECT status, balance_fen, token_limit FROM users WHERE id = $1", user_id)
    assert row is not None
    assert dict(row) == {"status": "active", "balance_fen": 0, "token_limit": 0}
    assert await harness.gw.db.fetchval("SELECT count(*) FROM ledger") == 0


async def test_a_body_that_is_not_an_object_is_400(
    api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    user_id, _ = await register(api, "nobody@airgate.test")
    for content in (b"", b"[1]", b"{oops"):
        api_error(await api.patch(f"{USERS}/{user_id}", headers=admin, content=content), 400)


async def test_an_overlong_idempotency_key_is_400(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    user_id, _ = await register(api, "longkey@airgate.test")
    response = await api.patch(f"{USERS}/{user_id}",
                               headers={**admin, "Idempotency-Key": secrets.token_hex(3000)},
                               json={"balance_fen_delta": 5})
    api_error(response, 400)
    assert await harness.gw.db.fetchval("SELECT count(*) FROM ledger") == 0


# -- stats ----------------------------------------------------------------------------------


async def test_stats_count_users_requests_tokens_revenue_and_pool_health(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    before = await api.get("/api/admin/stats", headers=admin)
    assert before.status_code == 200, before.text
    empty = before.json()
    assert set(empty) >= {"users", "activeUsers", "requests", "tokens", "revenue_fen",
                          "paidOrders", "pool"}
    assert (empty["users"], empty["requests"], empty["tokens"], empty["revenue_fen"],
            empty["paidOrders"], empty["activeUsers"]) == (1, 0, 0, 0, 0, 0)

    await harness.add_key()
    await harness.add_key("mock-healthy-2", status="disabled")
    user_id, token, sk = await user_with_key(harness, api, "busy@airgate.test")
    for _ in range(2):
        chat = await api.post("/v1/chat/completions", headers=bearer(sk), json=CHAT)
        assert chat.status_code == 200, chat.text
    paid = await buy(api, token)
    await pay(api, paid)
    await buy(api, token)  # pending: not revenue
    await harness.wait_for_usage(user_id, 2)

    async def counted() -> bool:
        data = (await api.get("/api/admin/stats", headers=admin)).json()
        return bool(data["requests"] == 2)

    await eventually(counted)
    data = (await api.get("/api/admin/stats", headers=admin)).json()
    tokens = await harness.gw.db.fetchval("SELECT sum(prompt_tokens + completion_tokens)"
                                          " FROM usage_records")
    assert (data["users"], data["activeUsers"], data["requests"]) == (2, 1, 2)
    assert data["tokens"] == tokens > 0
    assert (data["revenue_fen"], data["paidOrders"]) == (2900, 1)
    pool = data["pool"]
    assert isinstance(pool, dict)
    assert pool.get("healthy") == 1
    assert sum(pool.values()) == 2
