"""Plans, balance payments, coupons, rebate transfers: money is never lost or spent twice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import trio

from store.coupons import create_coupon
from store.db import Database
from store.ledger import Entry, apply_entry, ledger_totals
from tests.e2e.conftest import Harness, bearer


async def register(api: httpx.AsyncClient, email: str, **extra: Any) -> tuple[str, str]:
    response = await api.post("/api/auth/register",
                              json={"email": email, "password": "password-123", **extra})
    assert response.status_code == 200, response.text
    data = response.json()
    return data["user"]["id"], data["token"]



async def grant_balance(db: Database, user_id: str, fen: int, key: str) -> None:
    async with db.transaction() as conn:
        await apply_entry(conn, Entry(user_id, "admin_adjust", key, delta_balance_fen=fen))


async def assert_ledger_matches(db: Database, user_id: str) -> None:
    balance, rebate, _ = await ledger_totals(db, user_id)
    row = await db.fetchrow("SELECT balance_fen, rebate_fen FROM users WHERE id = $1", user_id)
    assert row is not None
    assert (row["balance_fen"], row["rebate_fen"]) == (balance, rebate)


async def test_plans_are_listed_in_the_seed_shape(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.base_url) as api:
        plans = (await api.get("/api/plans")).json()["plans"]
        starter = (await api.get("/api/plans/starter_monthly")).json()["plan"]
        missing = await api.get("/api/plans/nope")
    assert "starter_monthly" in {p["id"] for p in plans}
    assert starter == {"id": "starter_monthly", "name": "Starter (monthly)", "price": 29.0,
                       "price_fen": 2900, "tokenLimit": 5000000, "durationDays": 30,
                       "modelGroups": [], "status": "active"}
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


async def test_balance_payment_activates_the_plan_or_changes_nothing(harness: Harness) -> None:
    db = harness.gw.db
    async with httpx.AsyncClient(base_url=harness.base_url) as api:
        user_id, token = await register(api, "buyer@airgate.test")
        poor = await api.post("/api/orders/create", headers=bearer(token),
                              json={"planId": "starter_monthly", "paymentMethod": "balance"})
        assert poor.status_code == 402
        assert await db.fetchval("SELECT count(*) FROM orders") == 0
        await grant_balance(db, user_id, 5000, "grant-1")
        paid = await api.post("/api/orders/create", headers=bearer(token),
                              json={"planId": "starter_monthly", "paymentMethod": "balance"})
        assert paid.status_code == 201, paid.text
        assert paid.json()["order"]["status"] == "paid"
        me = (await api.get("/api/auth/me", headers=bearer(token))).json()["user"]
        stats = (await api.get("/api/usage/stats", headers=bearer(token))).json()
    assert me["plan"] == "starter_monthly"
    assert me["tokenLimit"] == 5_000_000
    assert me["balance_fen"] == 2100
    expected = datetime.now(UTC) + timedelta(days=30)
    assert abs(stats["expiresAt"] - expected.timestamp()) < 60
    assert stats["remaining"] == 5_000_000
    await assert_ledger_matches(db, user_id)


async def test_concurrent_balance_payments_never_overdraw(harness: Harness) -> None:
    db = harness.gw.db
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=30) as api:
        user_id, token = await register(api, "rush@airgate.test")
        await grant_balance(db, user_id, 3 * 2900 + 100, "grant-rush")
        statuses: list[int] = []

        async def buy() -> None:
            response = await api.post(
                "/api/orders/create", headers=bearer(token),
                json={"planId": "starter_monthly", "paymentMethod": "balance"})
            statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(buy)
    assert sorted(statuses) == [201] * 3 + [402] * 17
    row = await db.fetchrow("SELECT balance_fen, token_limit FROM users WHERE id = $1",
                            user_id)
    assert row is not None
    assert row["balance_fen"] == 100
    assert row["token_limit"] == 3 * 5_000_000
    assert await db.fetchval("SELECT count(*) FROM orders WHERE status = 'paid'") == 3
    await assert_ledger_matches(db, user_id)


async def test_a_single_use_coupon_is_redeemed_exactly_once(harness: Harness) -> None:
    db = harness.gw.db
    await create_coupon(db, code="ONCE", kind="balance", value=500, plan_id=None, max_uses=1,
                        expires_at=None)
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=30) as api:
        tokens = [(await register(api, f"c{i}@airgate.test"))[1] for i in range(20)]
        statuses: list[int] = []

        async def redeem(token: str) -> None:
            response = await api.post("/api/coupon/redeem", headers=bearer(token),
                                      json={"code": "ONCE"})
            statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for token in tokens:
                nursery.start_soon(redeem, token)
    assert sorted(statuses) == [200] + [409] * 19
    assert await db.fetchval("SELECT used FROM coupons WHERE code = 'ONCE'") == 1
    assert await db.fetchval("SELECT sum(balance_fen) FROM users") == 500


async def test_coupon_rules_per_user_total_and_expiry(harness: Harness) -> None:
    db = harness.gw.db
    await create_coupon(db, code="TOKENS", kind="tokens", value=1000, plan_id=None,
                        max_uses=5, expires_at=None)
    await create_coupon(db, code="OLD", kind="tokens", value=1, plan_id=None, max_uses=5,
                        expires_at=datetime.now(UTC) - timedelta(days=1))
    await create_coupon(db, code="PLAN", kind="plan", value=0, plan_id="pro_monthly",
                        max_uses=5, expires_at=None)
    async with httpx.AsyncClient(base_url=harness.base_url) as api:
        user_id, token = await register(api, "coupons@airgate.test")

        async def redeem(code: str) -> httpx.Response:
            return await api.post("/api/coupon/redeem", headers=bearer(token),
                                  json={"code": code})

        first = await redeem("TOKENS")
        again = await redeem("TOKENS")
        old = await redeem("OLD")
        unknown = await redeem("NOPE")
        plan = await redeem("PLAN")
        me = (await api.get("/api/auth/me", headers=bearer(token))).json()["user"]
    assert first.status_code == 200
    assert (again.status_code, again.json()["error"]["code"]) == (409,
                                                                  "coupon_already_redeemed")
    assert (old.status_code, old.json()["error"]["code"]) == (409, "coupon_expired")
    assert unknown.status_code == 404
    assert plan.status_code == 200
    assert me["plan"] == "pro_monthly"
    assert me["tokenLimit"] == 1000 + 30_000_000
    assert me["expiresAt"] is not None
    _, _, tokens = await ledger_totals(db, user_id)
    assert tokens == me["tokenLimit"]


async def test_concurrent_rebate_transfers_move_the_rebate_once(harness: Harness) -> None:
    db = harness.gw.db
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=30) as api:
        user_id, token = await register(api, "inviter@airgate.test")
        async with db.transaction() as conn:
            await apply_entry(conn, Entry(user_id, "rebate", "rebate-1", delta_rebate_fen=1000))
        statuses: list[int] = []

        async def move() -> None:
            response = await api.post("/api/invite/transfer", headers=bearer(token))
            statuses.append(response.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(move)
    assert sorted(statuses) == [200] + [409] * 19
    row = await db.fetchrow("SELECT balance_fen, rebate_fen FROM users WHERE id = $1", user_id)
    assert row is not None
    assert (row["balance_fen"], row["rebate_fen"]) == (1000, 0)
    await assert_ledger_matches(db, user_id)


async def test_invites_link_users_and_report_counts(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.base_url) as api:
        inviter_id, inviter = await register(api, "host@airgate.test")
        code = (await api.get("/api/invite/code", headers=bearer(inviter))).json()
        invitee_id, _ = await register(api, "guest@airgate.test",
                                       invite_code=code["invite_code"])
        stats = (await api.get("/api/invite/stats", headers=bearer(inviter))).json()
        listed = (await api.get("/api/invite/list", headers=bearer(inviter))).json()
    assert code["invite_code"].startswith("AIR-")
    assert stats["invited"] == 1
    assert stats["rebate_available_fen"] == 0
    assert listed["invitees"][0]["email"] == "gu***@airgate.test"
    invited_by = await harness.gw.db.fetchval("SELECT invited_by FROM users WHERE id = $1",
                                              invitee_id)
    assert invited_by == inviter_id


async def test_orders_are_private_and_only_pending_ones_cancel(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.base_url) as api:
        _, alice = await register(api, "alice@airgate.test")
        _, bob = await register(api, "bob@airgate.test")
        created = await api.post("/api/orders/create", headers=bearer(alice),
                                 json={"planId": "starter_monthly", "paymentMethod": "wxpay"})
        assert created.status_code == 201, created.text
        order_id = created.json()["orderId"]
        assert created.json()["code_url"].startswith("weixin://wxpay/")
        assert created.json()["expires_in"] == harness.gw.settings.order_ttl_s
        other = await api.post(f"/api/orders/{order_id}/cancel", headers=bearer(bob))
        bob_list = (await api.get("/api/orders", headers=bearer(bob))).json()["orders"]
        cancelled = await api.post(f"/api/orders/{order_id}/cancel", headers=bearer(alice))
        twice = await api.post(f"/api/orders/{order_id}/cancel", headers=bearer(alice))
        bad = await api.post("/api/orders/create", headers=bearer(alice),
                             json={"planId": "starter_monthly", "paymentMethod": "cash"})
    assert other.status_code == 404
    assert bob_list == []
    assert cancelled.status_code == 200
    assert cancelled.json()["order"]["status"] == "cancelled"
    assert twice.status_code == 409
    assert bad.status_code == 400


async def test_password_change_ends_older_sessions(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.base_url) as api:
        _, token = await register(api, "pw@airgate.test")
        wrong = await api.put("/api/auth/password", headers=bearer(token),
                              json={"oldPassword": "nope-nope", "newPassword": "new-pass-123"})
        assert wrong.status_code == 401
        changed = await api.put("/api/auth/password", headers=bearer(token),
                                json={"oldPassword": "password-123",
                                      "newPassword": "new-pass-123"})
        assert changed.status_code == 200
        stale = await api.get("/api/auth/me", headers=bearer(token))
        login = await api.post("/api/auth/login", json={"email": "pw@airgate.test",
                                                        "password": "new-pass-123"})
        fresh = await api.get("/api/auth/me", headers=bearer(login.json()["token"]))
    assert stale.status_code == 401
    assert fresh.status_code == 200
