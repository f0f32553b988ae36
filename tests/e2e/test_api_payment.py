"""WeChat Pay through the real signature code: the sandbox signs and encrypts real v3
notifications and posts them to the gateway's notify route over loopback."""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
import orjson
import trio

from store.ledger import ledger_totals
from tests.e2e.conftest import Harness
from tests.e2e.test_api_shop import bearer, register
from workers.payments import SANDBOX_PREFIX
from workers.wxpay import encrypt_resource, sign_response


async def buy(api: httpx.AsyncClient, token: str, plan: str = "starter_monthly") -> str:
    created = await api.post("/api/orders/create", headers=bearer(token),
                             json={"planId": plan, "paymentMethod": "wxpay"})
    assert created.status_code == 201, created.text
    order_id: str = created.json()["orderId"]
    return order_id


async def pay(api: httpx.AsyncClient, order_id: str, **body: Any) -> dict[str, Any]:
    response = await api.post(f"{SANDBOX_PREFIX}/pay/{order_id}", json=body or None)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def user_row(h: Harness, user_id: str) -> dict[str, Any]:
    row = await h.gw.db.fetchrow(
        "SELECT plan, token_limit, expires_at, balance_fen, rebate_fen FROM users"
        " WHERE id = $1", user_id)
    assert row is not None
    return dict(row)


async def test_the_demo_flow_buys_a_plan_end_to_end(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=20) as api:
        user_id, token = await register(api, "wx@airgate.test")
        order_id = await buy(api, token)
        qr = (await api.get("/api/payment/qrcode", headers=bearer(token),
                            params={"orderId": order_id})).json()
        png = await api.get("/api/payment/qrcode", headers=bearer(token),
                            params={"orderId": order_id, "format": "png"})
        png_by_accept = await api.get("/api/payment/qrcode", params={"orderId": order_id},
                                      headers={**bearer(token), "accept": "image/png"})
        before = (await api.get("/api/usage/stats", headers=bearer(token))).json()
        paid = await pay(api, order_id)
        after = (await api.get("/api/usage/stats", headers=bearer(token))).json()
        orders = (await api.get("/api/orders", headers=bearer(token))).json()["orders"]
        qr_after = await api.get("/api/payment/qrcode", headers=bearer(token),
                                 params={"orderId": order_id})
    assert qr["orderId"] == order_id
    assert qr["code_url"].startswith("weixin://wxpay/")
    assert 0 < qr["expires_in"] <= harness.gw.settings.order_ttl_s
    for image in (png, png_by_accept):
        assert image.headers["content-type"] == "image/png"
        assert image.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert paid["notify_status"] in (200, 204)
    assert (before["tokenLimit"], before["expiresAt"]) == (0, None)
    assert after["tokenLimit"] == 5_000_000
    assert after["plan"] == "starter_monthly"
    assert after["expiresAt"] > time.time() + 29 * 86400
    assert orders[0]["status"] == "paid"
    assert qr_after.status_code == 409
    _, _, tokens = await ledger_totals(harness.gw.db, user_id)
    assert tokens == 5_000_000


async def test_replayed_and_concurrent_notifications_fulfil_once(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=30) as api:
        inviter_id, inviter = await register(api, "inv@airgate.test")
        code = (await api.get("/api/invite/code", headers=bearer(inviter))).json()
        user_id, token = await register(api, "payer@airgate.test",
                                        invite_code=code["invite_code"])
        order_id = await buy(api, token)
        results: list[dict[str, Any]] = []

        async def deliver() -> None:
            results.append(await pay(api, order_id))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(deliver)
        await pay(api, order_id)  # and once more, later: a plain replay
    assert all(r["notify_status"] in (200, 204) for r in results)
    row = await user_row(harness, user_id)
    assert row["token_limit"] == 5_000_000
    assert await harness.gw.db.fetchval(
        "SELECT count(*) FROM ledger WHERE ref = $1 AND kind = 'payment'", order_id) == 1
    inviter_row = await user_row(harness, inviter_id)
    assert inviter_row["rebate_fen"] == 2900 * harness.gw.settings.invite_rebate_percent // 100
    _, rebate, _ = await ledger_totals(harness.gw.db, inviter_id)
    assert rebate == inviter_row["rebate_fen"]


async def test_a_wrong_amount_changes_nothing(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=20) as api:
        user_id, token = await register(api, "cheap@airgate.test")
        order_id = await buy(api, token)
        result = await pay(api, order_id, amount_fen=1)
    assert result["notify_status"] == 400
    assert (await user_row(harness, user_id))["token_limit"] == 0
    assert await harness.gw.db.fetchval("SELECT status FROM orders WHERE id = $1",
                                        order_id) == "pending"


def _notification(h: Harness, resource: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """A notification signed with the sandbox's own platform key."""
    keys = h.gw.payments.sandbox_keys
    assert keys is not None
    envelope = {
        "id": "EV-1", "create_time": "2026-11-25T12:00:00+08:00",
        "resource_type": "encrypt-resource", "event_type": "TRANSACTION.SUCCESS",
        "summary": "ok",
        "resource": encrypt_resource(keys.apiv3_key, orjson.dumps(resource),
                                     nonce="abcdefghijkl", associated_data="transaction"),
    }
    body = orjson.dumps(envelope)
    headers = sign_response(keys.platform_key, keys.platform_serial, body,
                            timestamp=int(time.time()), nonce="n" * 32)
    return headers, body


def _transaction(h: Harness, order_id: str, amount: int) -> dict[str, Any]:
    keys = h.gw.payments.sandbox_keys
    assert keys is not None
    return {
        "appid": keys.appid, "mchid": keys.mchid, "out_trade_no": order_id,
        "transaction_id": "4200000000" + order_id[-8:], "trade_state": "SUCCESS",
        "trade_type": "NATIVE", "success_time": "2026-11-25T12:00:00+08:00",
        "amount": {"total": amount, "payer_total": amount, "currency": "CNY",
                   "payer_currency": "CNY"},
    }


async def test_forged_and_unknown_notifications_are_refused(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=20) as api:
        user_id, token = await register(api, "forged@airgate.test")
        order_id = await buy(api, token)
        headers, body = _notification(harness, _transaction(harness, order_id, 2900))
        tampered = body.replace(b'"summary":"ok"', b'"summary":"OK"')
        bad_sig = {**headers, "Wechatpay-Signature": base64.b64encode(b"x" * 256).decode()}
        forged = await api.post("/api/payment/notify/wxpay", content=tampered, headers=headers)
        unsigned = await api.post("/api/payment/notify/wxpay", content=body)
        wrong_sig = await api.post("/api/payment/notify/wxpay", content=body, headers=bad_sig)
        unknown_h, unknown_b = _notification(harness, _transaction(harness, "ord_nope", 2900))
        unknown = await api.post("/api/payment/notify/wxpay", content=unknown_b,
                                 headers=unknown_h)
        genuine = await api.post("/api/payment/notify/wxpay", content=body, headers=headers)
    for refused in (forged, unsigned, wrong_sig):
        assert refused.status_code == 401
        assert refused.json()["code"] == "FAIL"
    assert unknown.status_code == 404
    assert genuine.status_code == 204
    assert (await user_row(harness, user_id))["token_limit"] == 5_000_000


async def test_the_reconciler_settles_a_payment_whose_notification_was_lost(
    harness: Harness,
) -> None:
    sandbox = harness.gw.payments.sandbox_app
    assert sandbox is not None
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=20) as api:
        user_id, token = await register(api, "lost@airgate.test")
        order_id = await buy(api, token)
        stale_id = await buy(api, token)

        async def lose(url: str, headers: dict[str, str], body: bytes) -> int:
            return 503  # WeChat Pay could not reach us

        sandbox.deliver = lose  # the sandbox's delivery hook: WeChat Pay cannot reach us
        await pay(api, order_id)
    assert (await user_row(harness, user_id))["token_limit"] == 0
    await harness.gw.db.execute(
        "UPDATE orders SET created_at = now() - interval '1 hour' WHERE id = $1", order_id)
    await harness.gw.db.execute(
        "UPDATE orders SET expires_at = now() - interval '1 second' WHERE id = $1", stale_id)
    await harness.gw.payments.reconcile()
    assert (await user_row(harness, user_id))["token_limit"] == 5_000_000
    statuses = dict(await harness.gw.db.fetch("SELECT id, status FROM orders"))
    assert statuses == {order_id: "paid", stale_id: "expired"}
    assert sandbox.order_state(stale_id) == "CLOSED"


async def test_qrcode_and_order_lookups_refuse_what_is_not_yours(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=20) as api:
        _, alice = await register(api, "qa@airgate.test")
        _, bob = await register(api, "qb@airgate.test")
        order_id = await buy(api, alice)
        missing = await api.get("/api/payment/qrcode", headers=bearer(alice))
        foreign = await api.get("/api/payment/qrcode", headers=bearer(bob),
                                params={"orderId": order_id})
        unknown = await api.get("/api/payment/qrcode", headers=bearer(alice),
                                params={"orderId": "ord_nope"})
        anonymous = await api.get("/api/payment/qrcode", params={"orderId": order_id})
        mine = await api.get(f"/api/orders/{order_id}", headers=bearer(alice))
        theirs = await api.get(f"/api/orders/{order_id}", headers=bearer(bob))
    assert missing.status_code == 400
    assert (foreign.status_code, unknown.status_code, anonymous.status_code) == (404, 404, 401)
    assert mine.status_code == 200
    assert mine.json()["order"]["status"] == "pending"
    assert theirs.status_code == 404
    for response in (missing, foreign, unknown, anonymous, theirs):
        assert set(response.json()["error"]) == {"message", "code"}
