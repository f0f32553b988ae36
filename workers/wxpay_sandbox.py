"""The WeChat Pay sandbox: a fake v3 server for demos and tests, used when no merchant is set.

:func:`sandbox_keys` makes (in memory) a merchant key pair, a platform key pair with serial
``SANDBOX-PLATFORM`` and an APIv3 key; :func:`sandbox_config` turns them into the
``MerchantConfig`` the real client and notification handler use, so sandbox payments go
through exactly the same signing, verification and decryption code as real ones.

:class:`SandboxWxPay` is a raw ASGI app implementing the subset of v3 we call (Native order,
query by out_trade_no, close), verifying the merchant's ``Authorization`` and signing every
reply with the platform key, plus the sandbox-only ``POST /pay/{out_trade_no}`` that plays
the payer: it marks the order paid and sends a signed, encrypted ``TRANSACTION.SUCCESS``
notification to the order's ``notify_url`` through the injected ``deliver``. It may be
mounted under a prefix (constructor argument, or the ASGI ``root_path``). State is in memory
and touched only from the request handlers (one trio thread, no awaits between reads and
writes of an order).

Imports ``workers.wxpay`` and ``workers.wxpay_client`` (for the default ``deliver``) only.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Final
from urllib.parse import parse_qs, unquote

import orjson
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from workers.wxpay import (
    EVENT_TRANSACTION_SUCCESS,
    ORIGINAL_TYPE_TRANSACTION,
    RESOURCE_TYPE_ENCRYPTED,
    MerchantConfig,
    SignatureError,
    encrypt_resource,
    new_nonce,
    sign_response,
    verify_authorization,
)
from workers.wxpay_client import post_notification

Message = dict[str, Any]
Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Deliver = Callable[[str, Mapping[str, str], bytes], Awaitable[int]]

SANDBOX_MCHID: Final = "1900000000"
SANDBOX_APPID: Final = "wxsandbox00000000"
SANDBOX_MERCHANT_SERIAL: Final = "SANDBOX-MERCHANT"
SANDBOX_PLATFORM_SERIAL: Final = "SANDBOX-PLATFORM"
_CHINA_TZ: Final = timezone(timedelta(hours=8))
_MAX_BODY_BYTES: Final = 64 * 1024
_OUT_TRADE_NO = re.compile(r"[0-9A-Za-z_\-|*]{6,32}")
_ORDER_PATH = re.compile(r"/v3/pay/transactions/out-trade-no/([^/]+)")
_CLOSE_PATH = re.compile(r"/v3/pay/transactions/out-trade-no/([^/]+)/close")
_PAY_PATH = re.compile(r"/pay/([^/]+)")


@dataclass(frozen=True)
class SandboxKeys:
    merchant_key: RSAPrivateKey = field(repr=False)
    platform_key: RSAPrivateKey = field(repr=False)
    apiv3_key: bytes = field(repr=False)
    mchid: str = SANDBOX_MCHID
    appid: str = SANDBOX_APPID
    merchant_serial: str = SANDBOX_MERCHANT_SERIAL
    platform_serial: str = SANDBOX_PLATFORM_SERIAL


def sandbox_keys() -> SandboxKeys:
    """Fresh in-memory keys (RSA-2048 merchant and platform pairs, a 32-byte APIv3 key)."""
    return SandboxKeys(
        merchant_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        platform_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        apiv3_key=secrets.token_hex(16).encode(),
    )


def sandbox_config(keys: SandboxKeys, notify_url: str, api_base: str) -> MerchantConfig:
    """The merchant side of the sandbox: what ``WxPayClient``/``parse_notification`` use."""
    return MerchantConfig(
        mchid=keys.mchid,
        appid=keys.appid,
        serial_no=keys.merchant_serial,
        private_key=keys.merchant_key,
        apiv3_key=keys.apiv3_key,
        platform_keys={keys.platform_serial: keys.platform_key.public_key()},
        notify_url=notify_url,
        api_base=api_base.rstrip("/"),
    )


@dataclass
class _Order:
    out_trade_no: str
    description: str
    amount_fen: int
    notify_url: str
    time_expire: datetime | None
    code_url: str
    state: str = "NOTPAY"
    transaction_id: str | None = None
    success_time: str | None = None


class _Reply(Exception):
    """Ends a handler with a WeChat-style error reply."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = orjson.dumps({"code": code, "message": message})


class SandboxWxPay:
    """A fake WeChat Pay v3 server (ASGI). See the module docstring."""

    def __init__(
        self,
        keys: SandboxKeys,
        *,
        prefix: str = "",
        deliver: Deliver | None = None,
        clock: Callable[[], float] = time.time,
        max_skew_s: int = 300,
    ) -> None:
        self._keys = keys
        self._merchant_public = keys.merchant_key.public_key()
        self._prefix = prefix.rstrip("/")
        self.deliver: Deliver = deliver if deliver is not None else post_notification
        self._clock = clock
        self._max_skew_s = max_skew_s
        self._orders: dict[str, _Order] = {}

    def order_state(self, out_trade_no: str) -> str | None:
        """The sandbox's view of an order (for tests and the demo page)."""
        order = self._orders.get(out_trade_no)
        return None if order is None else order.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        status, payload = await self._handle(scope, body)
        now = int(self._clock())
        headers = sign_response(
            self._keys.platform_key,
            self._keys.platform_serial,
            payload,
            timestamp=now,
            nonce=new_nonce(),
        )
        raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        if status != 204:
            raw_headers.append((b"content-type", b"application/json; charset=utf-8"))
            raw_headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload if status != 204 else b""})

    async def _handle(self, scope: Scope, body: bytes) -> tuple[int, bytes]:
        method: str = scope["method"]
        target = _request_path(scope)
        query = scope.get("query_string", b"").decode("latin-1")
        prefix = self._prefix or scope.get("root_path", "").rstrip("/")
        if prefix and not target.startswith(prefix + "/"):
            return 404, orjson.dumps({"code": "NOT_FOUND", "message": "no such path"})
        path = unquote(target[len(prefix) :])
        try:
            if method == "POST" and (match := _PAY_PATH.fullmatch(path)):
                return await self._pay(_order_no(match[1]), body)
            signed_url = target + (f"?{query}" if query else "")
            self._authenticate(method, signed_url, body, scope)
            if method == "POST" and path == "/v3/pay/transactions/native":
                return 200, self._create(body)
            if method == "POST" and (match := _CLOSE_PATH.fullmatch(path)):
                return self._close(_order_no(match[1]), body)
            if method == "GET" and (match := _ORDER_PATH.fullmatch(path)):
                return 200, self._query(_order_no(match[1]), query)
            raise _Reply(404, "NOT_FOUND", "no such API in the sandbox")
        except _Reply as reply:
            return reply.status, reply.body

    def _authenticate(self, method: str, url: str, body: bytes, scope: Scope) -> None:
        authorization = ""
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                authorization = value.decode("latin-1")
        try:
            params = verify_authorization(
                self._merchant_public,
                method,
                url,
                body,
                authorization,
                now=self._clock(),
                max_skew_s=self._max_skew_s,
            )
        except SignatureError as exc:
            raise _Reply(401, "SIGN_ERROR", f"signature verification failed: {exc}") from exc
        if params["mchid"] != self._keys.mchid or params["serial_no"] != (
            self._keys.merchant_serial
        ):
            raise _Reply(401, "SIGN_ERROR", "unknown merchant or certificate serial")

    # -- the v3 APIs -------------------------------------------------------------------------

    def _create(self, body: bytes) -> bytes:
        data = _json_object(body)
        if data.get("mchid") != self._keys.mchid or data.get("appid") != self._keys.appid:
            raise _Reply(400, "APPID_MCHID_NOT_MATCH", "appid and mchid do not match")
        out_trade_no = _order_no(data.get("out_trade_no"))
        description, notify_url = data.get("description"), data.get("notify_url")
        amount = data.get("amount")
        total = amount.get("total") if isinstance(amount, dict) else None
        if not isinstance(description, str) or not isinstance(notify_url, str):
            raise _Reply(400, "PARAM_ERROR", "description and notify_url are required")
        if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
            raise _Reply(400, "PARAM_ERROR", "amount.total must be a positive integer")
        expire = data.get("time_expire")
        try:
            time_expire = datetime.fromisoformat(expire) if isinstance(expire, str) else None
        except ValueError as exc:
            raise _Reply(400, "PARAM_ERROR", "time_expire is not RFC 3339") from exc
        existing = self._orders.get(out_trade_no)
        if existing is not None:
            if existing.state == "CLOSED":
                raise _Reply(400, "ORDER_CLOSED", "the order is closed")
            if existing.state == "SUCCESS":
                raise _Reply(400, "ORDERPAID", "the order is paid")
            if existing.amount_fen != total or existing.description != description:
                raise _Reply(403, "OUT_TRADE_NO_USED", "out_trade_no used with other params")
            return orjson.dumps({"code_url": existing.code_url})
        order = _Order(
            out_trade_no=out_trade_no,
            description=description,
            amount_fen=total,
            notify_url=notify_url,
            time_expire=time_expire,
            code_url=f"weixin://wxpay/bizpayurl?pr={secrets.token_urlsafe(6)}",
        )
        self._orders[out_trade_no] = order
        return orjson.dumps({"code_url": order.code_url})

    def _query(self, out_trade_no: str, query: str) -> bytes:
        mchid = parse_qs(query).get("mchid", [""])[0]
        if mchid != self._keys.mchid:
            raise _Reply(400, "PARAM_ERROR", "mchid does not match")
        return orjson.dumps(self._transaction(self._find(out_trade_no)))

    def _close(self, out_trade_no: str, body: bytes) -> tuple[int, bytes]:
        if _json_object(body).get("mchid") != self._keys.mchid:
            raise _Reply(400, "PARAM_ERROR", "mchid does not match")
        order = self._find(out_trade_no)
        if order.state == "CLOSED":
            raise _Reply(400, "ORDER_CLOSED", "the order is already closed")
        if order.state == "SUCCESS":
            raise _Reply(400, "ORDERPAID", "the order is paid")
        order.state = "CLOSED"
        return 204, b""

    async def _pay(self, out_trade_no: str, body: bytes) -> tuple[int, bytes]:
        """Play the payer: mark paid (once) and send the notification (again on a repeat)."""
        order = self._find(out_trade_no)
        tampered = _json_object(body).get("amount_fen") if body.strip() else None
        if order.state == "CLOSED":
            raise _Reply(400, "ORDER_CLOSED", "the order is closed")
        now = self._clock()
        if order.state == "NOTPAY":
            if order.time_expire is not None and now > order.time_expire.timestamp():
                raise _Reply(400, "ORDER_EXPIRED", "the order's time_expire has passed")
            order.state = "SUCCESS"
            order.transaction_id = "4200" + "".join(secrets.choice("0123456789") for _ in range(24))
            order.success_time = _rfc3339(now)
        transaction = self._transaction(order)
        if isinstance(tampered, int) and not isinstance(tampered, bool):
            transaction["amount"] = dict(
                transaction["amount"], total=tampered, payer_total=tampered
            )
        headers, notification = self._notification(transaction, now)
        status = await self.deliver(order.notify_url, headers, notification)
        return 200, orjson.dumps(
            {"out_trade_no": out_trade_no, "trade_state": order.state, "notify_status": status}
        )

    def _notification(
        self, transaction: dict[str, Any], now: float
    ) -> tuple[dict[str, str], bytes]:
        resource = encrypt_resource(
            self._keys.apiv3_key,
            orjson.dumps(transaction),
            nonce=secrets.token_hex(6),
            associated_data=ORIGINAL_TYPE_TRANSACTION,
        )
        body = orjson.dumps(
            {
                "id": f"EV-{secrets.token_hex(10)}",
                "create_time": _rfc3339(now),
                "resource_type": RESOURCE_TYPE_ENCRYPTED,
                "event_type": EVENT_TRANSACTION_SUCCESS,
                "summary": "支付成功",
                "resource": resource,
            }
        )
        headers = sign_response(
            self._keys.platform_key,
            self._keys.platform_serial,
            body,
            timestamp=int(now),
            nonce=new_nonce(),
        )
        headers["Content-Type"] = "application/json"
        return headers, body

    def _find(self, out_trade_no: str) -> _Order:
        order = self._orders.get(out_trade_no)
        if order is None:
            raise _Reply(404, "ORDER_NOT_EXIST", "the order does not exist")
        return order

    def _transaction(self, order: _Order) -> dict[str, Any]:
        paid = order.state == "SUCCESS"
        amount: dict[str, Any] = {"total": order.amount_fen, "currency": "CNY"}
        transaction: dict[str, Any] = {
            "appid": self._keys.appid,
            "mchid": self._keys.mchid,
            "out_trade_no": order.out_trade_no,
            "trade_type": "NATIVE",
            "trade_state": order.state,
            "trade_state_desc": {"SUCCESS": "支付成功", "CLOSED": "已关闭"}.get(
                order.state, "未支付"
            ),
            "amount": amount,
        }
        if paid:
            amount.update(payer_total=order.amount_fen, payer_currency="CNY")
            transaction.update(
                transaction_id=order.transaction_id,
                bank_type="OTHERS",
                success_time=order.success_time,
                payer={"openid": "sandbox-payer"},
            )
        return transaction


def _request_path(scope: Scope) -> str:
    """The path as the client sent (and signed) it, prefix included, without the query."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        return raw.split(b"?", 1)[0].decode("latin-1")
    root: str = scope.get("root_path", "")
    path: str = scope["path"]
    return path if path.startswith(root) else root + path


def _order_no(value: object) -> str:
    if not isinstance(value, str) or _OUT_TRADE_NO.fullmatch(value) is None:
        raise _Reply(400, "PARAM_ERROR", "out_trade_no is invalid")
    return value


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _Reply(400, "PARAM_ERROR", "the body is not JSON") from exc
    if not isinstance(data, dict):
        raise _Reply(400, "PARAM_ERROR", "the body is not a JSON object")
    return data


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), _CHINA_TZ).isoformat(timespec="seconds")


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY_BYTES:
            break  # the handlers then see a truncated, invalid body and answer 400/401
        parts.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(parts)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
