"""The WeChat Pay client against the sandbox server: signed requests, verified replies, the
payer's notification through the same parse path as production, error translation.

The sandbox runs in-process through ``httpx.ASGITransport`` (trio-compatible in httpx 0.28)
and once over loopback with hypercorn on ``127.0.0.1:0``, on the real clock.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, cast

import httpx
import orjson
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from workers.wxpay import MerchantConfig, PaymentResult, parse_notification
from workers.wxpay_client import WxPayClient, WxPayError, format_time_expire, open_wxpay_client
from workers.wxpay_sandbox import SandboxKeys, SandboxWxPay, sandbox_config, sandbox_keys

PREFIX = "/_sandbox/wxpay"
BASE = "http://sandbox.test"
NOTIFY_URL = "https://airgate.test/api/payment/notify/wxpay"


@dataclass
class Inbox:
    """The merchant's notify endpoint, as a ``deliver`` callable."""

    status: int = 204
    received: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    async def __call__(self, url: str, headers: Mapping[str, str], body: bytes) -> int:
        self.received.append((url, dict(headers), body))
        return self.status


@pytest.fixture(scope="module")
def keys() -> SandboxKeys:
    return sandbox_keys()


@pytest.fixture
def inbox() -> Inbox:
    return Inbox()


@pytest.fixture
def sandbox(keys: SandboxKeys, inbox: Inbox) -> SandboxWxPay:
    return SandboxWxPay(keys, prefix=PREFIX, deliver=inbox)


@pytest.fixture
def config(keys: SandboxKeys) -> MerchantConfig:
    return sandbox_config(keys, NOTIFY_URL, BASE + PREFIX)


def make_client(config: MerchantConfig, app: Any, **kwargs: Any) -> WxPayClient:
    transport = httpx.ASGITransport(app=app)
    return WxPayClient(config, timeout_s=5, connect_timeout_s=5, transport=transport, **kwargs)


@pytest.fixture
async def client(config: MerchantConfig, sandbox: SandboxWxPay) -> AsyncIterator[WxPayClient]:
    wx = make_client(config, sandbox)
    yield wx
    await wx.aclose()


async def pay(sandbox: SandboxWxPay, out_trade_no: str, body: bytes = b"") -> httpx.Response:
    """The payer scanning the code: the sandbox-only ``POST /pay/{out_trade_no}``."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sandbox)) as payer:
        return await payer.post(f"{BASE}{PREFIX}/pay/{out_trade_no}", content=body)


def expiry(minutes: int = 15) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


async def test_native_order_pay_notify_query(
    client: WxPayClient, sandbox: SandboxWxPay, config: MerchantConfig, inbox: Inbox
) -> None:
    code_url = await client.create_native_order("AG20250101000001", "Pro plan", 990, expiry())
    assert code_url.startswith("weixin://wxpay/bizpayurl?pr=")
    # Asking again for the same order gives the same code (the QR page may be reloaded).
    assert await client.create_native_order("AG20250101000001", "Pro plan", 990, expiry()) == (
        code_url
    )

    unpaid = await client.query_order("AG20250101000001")
    assert unpaid is not None
    assert (unpaid.trade_state, unpaid.paid, unpaid.transaction_id) == ("NOTPAY", False, None)
    assert unpaid.amount_total_fen == 990

    reply = await pay(sandbox, "AG20250101000001")
    assert reply.status_code == 200
    assert reply.json() == {
        "out_trade_no": "AG20250101000001",
        "trade_state": "SUCCESS",
        "notify_status": 204,
    }
    [(url, headers, body)] = inbox.received
    assert url == NOTIFY_URL
    assert headers["Wechatpay-Serial"] == "SANDBOX-PLATFORM"
    notified = parse_notification(config, headers, body, now=time.time())
    assert notified.out_trade_no == "AG20250101000001"
    assert (notified.trade_state, notified.amount_total_fen, notified.payer_total_fen) == (
        "SUCCESS",
        990,
        990,
    )
    assert notified.transaction_id is not None
    assert notified.success_time is not None
    assert orjson.loads(body)["resource"]["algorithm"] == "AEAD_AES_256_GCM"

    paid = await client.query_order("AG20250101000001")
    assert paid == notified

    # WeChat Pay repeats notifications: a second "pay" re-delivers the same transaction.
    await pay(sandbox, "AG20250101000001")
    assert len(inbox.received) == 2
    again = parse_notification(config, inbox.received[1][1], inbox.received[1][2], now=time.time())
    assert again.transaction_id == notified.transaction_id

    with pytest.raises(WxPayError) as info:
        await client.close_order("AG20250101000001")
    assert (info.value.wx_code, info.value.http_status) == ("ORDERPAID", 400)


async def test_close_is_idempotent_and_stops_payment(
    client: WxPayClient, sandbox: SandboxWxPay, inbox: Inbox
) -> None:
    await client.create_native_order("AG20250101000002", "Pro plan", 990, expiry())
    await client.close_order("AG20250101000002")
    closed = await client.query_order("AG20250101000002")
    assert closed is not None
    assert closed.trade_state == "CLOSED"
    await client.close_order("AG20250101000002")  # ORDER_CLOSED, signed: done already
    reply = await pay(sandbox, "AG20250101000002")
    assert (reply.status_code, reply.json()["code"]) == (400, "ORDER_CLOSED")
    assert inbox.received == []
    with pytest.raises(WxPayError) as info:
        await client.create_native_order("AG20250101000002", "Pro plan", 990, expiry())
    assert info.value.wx_code == "ORDER_CLOSED"


async def test_unknown_order_is_none(client: WxPayClient) -> None:
    assert await client.query_order("AG-never-created") is None
    with pytest.raises(WxPayError) as info:
        await client.close_order("AG-never-created")
    assert (info.value.wx_code, info.value.http_status) == ("ORDER_NOT_EXIST", 404)


async def test_tampered_amount_reaches_the_notification(
    client: WxPayClient, sandbox: SandboxWxPay, config: MerchantConfig, inbox: Inbox
) -> None:
    await client.create_native_order("AG20250101000003", "Pro plan", 990, expiry())
    await pay(sandbox, "AG20250101000003", orjson.dumps({"amount_fen": 1}))
    [(_url, headers, body)] = inbox.received
    notified = parse_notification(config, headers, body, now=time.time())
    assert notified.amount_total_fen == 1  # the order said 990: fulfilment must refuse


async def test_expired_order_cannot_be_paid(client: WxPayClient, sandbox: SandboxWxPay) -> None:
    await client.create_native_order(
        "AG20250101000004", "Pro plan", 990, datetime.now(UTC) - timedelta(seconds=5)
    )
    reply = await pay(sandbox, "AG20250101000004")
    assert (reply.status_code, reply.json()["code"]) == (400, "ORDER_EXPIRED")
    assert sandbox.order_state("AG20250101000004") == "NOTPAY"


async def test_forged_reply_signature_is_rejected(
    config: MerchantConfig, sandbox: SandboxWxPay
) -> None:
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    trusting_other_key = replace(config, platform_keys={"SANDBOX-PLATFORM": impostor.public_key()})
    async with open_wxpay_client(
        trusting_other_key,
        timeout_s=5,
        connect_timeout_s=5,
        transport=httpx.ASGITransport(app=sandbox),
    ) as wx:
        with pytest.raises(WxPayError) as info:
            await wx.create_native_order("AG20250101000005", "Pro plan", 990, expiry())
    assert info.value.wx_code == "INVALID_SIGNATURE"
    assert not info.value.transient


async def test_reply_altered_in_transit_is_rejected(
    config: MerchantConfig, sandbox: SandboxWxPay
) -> None:
    inner = httpx.ASGITransport(app=sandbox)

    async def tamper(request: httpx.Request) -> httpx.Response:
        response = await inner.handle_async_request(request)
        body = await response.aread()
        forged = body.replace(b"weixin://wxpay/", b"weixin://evil//")
        return httpx.Response(response.status_code, headers=response.headers, content=forged)

    wx = WxPayClient(
        config, timeout_s=5, connect_timeout_s=5, transport=httpx.MockTransport(tamper)
    )
    with pytest.raises(WxPayError) as info:
        await wx.create_native_order("AG20250101000006", "Pro plan", 990, expiry())
    await wx.aclose()
    assert info.value.wx_code == "INVALID_SIGNATURE"


@pytest.mark.parametrize("status", [200, 204, 404])
async def test_unsigned_replies_are_not_trusted(config: MerchantConfig, status: int) -> None:
    def unsigned(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"code": "ORDER_NOT_EXIST", "message": "gone"})

    wx = WxPayClient(
        config, timeout_s=5, connect_timeout_s=5, transport=httpx.MockTransport(unsigned)
    )
    with pytest.raises(WxPayError) as info:
        await wx.query_order("AG20250101000007")
    await wx.aclose()
    # A 2xx without a signature is forged; an unsigned 404 is an error, not "no such order".
    assert info.value.wx_code == ("INVALID_SIGNATURE" if status < 300 else "ORDER_NOT_EXIST")


async def test_wrong_merchant_key_is_refused_by_the_sandbox(
    config: MerchantConfig, sandbox: SandboxWxPay
) -> None:
    stranger = replace(
        config, private_key=rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    wx = make_client(stranger, sandbox)
    with pytest.raises(WxPayError) as info:
        await wx.create_native_order("AG20250101000008", "Pro plan", 990, expiry())
    await wx.aclose()
    assert (info.value.wx_code, info.value.http_status) == ("SIGN_ERROR", 401)


async def test_request_with_a_stale_clock_is_refused(
    config: MerchantConfig, sandbox: SandboxWxPay
) -> None:
    # A client an hour behind: the sandbox refuses its request timestamp. (The wide skew
    # lets this client accept the sandbox's signed 401 so we can see the refusal itself.)
    wx = make_client(config, sandbox, clock=lambda: time.time() - 3600, max_skew_s=7200)
    with pytest.raises(WxPayError) as info:
        await wx.query_order("AG20250101000009")
    await wx.aclose()
    assert (info.value.wx_code, info.value.http_status) == ("SIGN_ERROR", 401)


async def test_transport_errors_are_translated(config: MerchantConfig) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    wx = WxPayClient(
        config, timeout_s=5, connect_timeout_s=5, transport=httpx.MockTransport(refuse)
    )
    with pytest.raises(WxPayError) as info:
        await wx.query_order("AG20250101000010")
    await wx.aclose()
    assert (info.value.wx_code, info.value.transient, info.value.status) == (
        "NETWORK_ERROR",
        True,
        502,
    )


async def test_requests_carry_the_documented_headers(config: MerchantConfig) -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(500, json={"code": "SYSTEM_ERROR", "message": "busy"})

    pub_config = replace(
        config, platform_keys={"PUB_KEY_ID_0123": next(iter(config.platform_keys.values()))}
    )
    wx = WxPayClient(
        pub_config, timeout_s=5, connect_timeout_s=5, transport=httpx.MockTransport(record)
    )
    moment = datetime(2025, 1, 1, 4, 0, tzinfo=UTC)
    with pytest.raises(WxPayError) as info:
        await wx.create_native_order("AG20250101000011", "Pro plan", 990, moment)
    await wx.aclose()
    assert (info.value.wx_code, info.value.transient) == ("SYSTEM_ERROR", True)
    [request] = seen
    assert request.url.path == PREFIX + "/v3/pay/transactions/native"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Wechatpay-Serial"] == "PUB_KEY_ID_0123"
    assert request.headers["Authorization"].startswith('WECHATPAY2-SHA256-RSA2048 mchid="')
    assert orjson.loads(request.content) == {
        "appid": config.appid,
        "mchid": config.mchid,
        "description": "Pro plan",
        "out_trade_no": "AG20250101000011",
        "time_expire": "2025-01-01T12:00:00+08:00",
        "notify_url": NOTIFY_URL,
        "amount": {"total": 990, "currency": "CNY"},
    }


async def test_arguments_are_validated(client: WxPayClient) -> None:
    with pytest.raises(ValueError, match="out_trade_no"):
        await client.query_order("a/b")
    with pytest.raises(ValueError, match="out_trade_no"):
        await client.close_order("short")
    with pytest.raises(ValueError, match="timezone"):
        await client.create_native_order("AG20250101000012", "x", 1, datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="amount_fen"):
        await client.create_native_order("AG20250101000012", "x", 0, expiry())
    with pytest.raises(ValueError, match="description"):
        await client.create_native_order("AG20250101000012", "x" * 128, 1, expiry())
    assert format_time_expire(datetime(2015, 5, 20, 5, 29, 35, tzinfo=UTC)) == (
        "2015-05-20T13:29:35+08:00"
    )


async def test_loopback_with_the_default_deliver(keys: SandboxKeys) -> None:
    """The sandbox on a real socket; its default ``deliver`` POSTs to our notify route."""
    sandbox = SandboxWxPay(keys, prefix=PREFIX)
    notified: list[tuple[dict[str, str], bytes]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/api/payment/notify/wxpay":
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            notified.append((headers, body))
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        else:
            await sandbox(scope, receive, send)

    hyper = HypercornConfig()
    hyper.bind = ["127.0.0.1:0"]
    hyper.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = cast(list[str], await nursery.start(partial(serve, cast(Any, app), hyper)))
        base = "http://" + binds[0].rsplit("://", 1)[-1]
        config = sandbox_config(keys, f"{base}/api/payment/notify/wxpay", base + PREFIX)
        async with open_wxpay_client(config, timeout_s=10, connect_timeout_s=5) as wx:
            code_url = await wx.create_native_order("AG20250101000013", "Pro", 990, expiry())
            assert code_url.startswith("weixin://wxpay/")
            async with httpx.AsyncClient(timeout=10) as payer:
                reply = await payer.post(f"{base}{PREFIX}/pay/AG20250101000013")
            assert reply.json()["notify_status"] == 204
            [(headers, body)] = notified
            result: PaymentResult = parse_notification(config, headers, body, now=time.time())
            assert (result.out_trade_no, result.amount_total_fen) == ("AG20250101000013", 990)
            queried = await wx.query_order("AG20250101000013")
            assert queried == result
        nursery.cancel_scope.cancel()
