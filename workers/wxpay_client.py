"""The WeChat Pay v3 HTTP client: Native orders, order queries, closing orders.

Owns one ``httpx.AsyncClient`` (trio-compatible) per merchant. Every request is signed with
the merchant key; every response that we act on is verified against the platform keys (a
2xx without a valid signature is treated as forged, as the v3 rules require). httpx and
WeChat Pay errors are translated into :class:`WxPayError` here and nowhere else. Logs carry
the API, the HTTP status and WeChat's error code only, never keys, signatures or bodies.

APIs used (直连商户):
- ``POST /v3/pay/transactions/native`` -> ``{"code_url": ...}``
- ``GET /v3/pay/transactions/out-trade-no/{out_trade_no}?mchid=...`` -> a transaction
  (404 ``ORDER_NOT_EXIST`` when WeChat Pay has no such order)
- ``POST /v3/pay/transactions/out-trade-no/{out_trade_no}/close`` body ``{"mchid"}`` -> 204

This module and ``workers.upstream`` are the only httpx users; it imports only
``workers.wxpay`` and ``workers.errors`` from the gateway.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Final

import httpx
import orjson

from workers.errors import UpstreamError
from workers.wxpay import (
    MerchantConfig,
    NotificationError,
    PaymentResult,
    SignatureError,
    build_authorization,
    check_merchant,
    new_nonce,
    transaction_from_json,
    verify_signature,
)

_LOG = logging.getLogger("workers.wxpay_client")
_USER_AGENT: Final = "airgate-wxpay/1"
# 商户订单号: 6-32 characters of digits, letters and _-|* (Native下单).
_OUT_TRADE_NO = re.compile(r"[0-9A-Za-z_\-|*]{6,32}")
_DESCRIPTION_MAX_CHARS: Final = 127
# time_expire is RFC 3339 with an explicit offset; the docs' examples use Beijing time.
_CHINA_TZ: Final = timezone(timedelta(hours=8))


class WxPayError(UpstreamError):
    """WeChat Pay refused, failed, or answered with something we cannot trust.

    ``wx_code``/``wx_message`` are WeChat Pay's ``code``/``message`` (or our own code for
    transport and verification failures: ``NETWORK_ERROR``, ``TIMEOUT``,
    ``INVALID_SIGNATURE``, ``INVALID_RESPONSE``); ``transient`` says a later retry may work.
    """

    code = "payment_provider_error"

    def __init__(
        self,
        wx_code: str,
        wx_message: str = "",
        *,
        http_status: int | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(f"WeChat Pay error {wx_code}")
        self.wx_code = wx_code
        self.wx_message = wx_message
        self.http_status = http_status
        self.transient = transient


def format_time_expire(moment: datetime) -> str:
    """``yyyy-MM-DDTHH:mm:ss+08:00`` (RFC 3339) for an aware datetime."""
    if moment.tzinfo is None:
        raise ValueError("time_expire must be timezone-aware")
    return moment.astimezone(_CHINA_TZ).isoformat(timespec="seconds")


def _check_out_trade_no(out_trade_no: str) -> str:
    if _OUT_TRADE_NO.fullmatch(out_trade_no) is None:
        raise ValueError("out_trade_no must be 6-32 characters of [0-9A-Za-z_-|*]")
    return out_trade_no


class WxPayClient:
    """Signed, verified calls to the WeChat Pay v3 API for one merchant."""

    def __init__(
        self,
        config: MerchantConfig,
        *,
        timeout_s: float,
        connect_timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        max_skew_s: int = 300,
    ) -> None:
        """``transport`` replaces the network (tests pass an ``httpx.ASGITransport`` of the
        sandbox); ``clock`` gives the epoch seconds used to sign and to check replies."""
        self._config = config
        self._clock = clock
        self._max_skew_s = max_skew_s
        self._base = config.api_base.rstrip("/")
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def create_native_order(
        self, out_trade_no: str, description: str, amount_fen: int, time_expire: datetime
    ) -> str:
        """Place a Native order and return its ``code_url`` (for the QR code)."""
        _check_out_trade_no(out_trade_no)
        if not 0 < len(description) <= _DESCRIPTION_MAX_CHARS:
            raise ValueError(f"description must be 1-{_DESCRIPTION_MAX_CHARS} characters")
        if isinstance(amount_fen, bool) or not isinstance(amount_fen, int) or amount_fen <= 0:
            raise ValueError("amount_fen must be a positive integer")
        payload = {
            "appid": self._config.appid,
            "mchid": self._config.mchid,
            "description": description,
            "out_trade_no": out_trade_no,
            "time_expire": format_time_expire(time_expire),
            "notify_url": self._config.notify_url,
            "amount": {"total": amount_fen, "currency": "CNY"},
        }
        response = await self._call("POST", "/v3/pay/transactions/native", payload, "native")
        if response.status_code != 200:
            raise self._refusal(response, "native")
        data = self._json(response, "native")
        code_url = data.get("code_url")
        if not isinstance(code_url, str) or not code_url:
            raise WxPayError("INVALID_RESPONSE", "native order reply has no code_url")
        return code_url

    async def query_order(self, out_trade_no: str) -> PaymentResult | None:
        """The order's state at WeChat Pay, or None when WeChat Pay has no such order."""
        _check_out_trade_no(out_trade_no)
        path = f"/v3/pay/transactions/out-trade-no/{out_trade_no}"
        response = await self._call(
            "GET", path, None, "query", params={"mchid": self._config.mchid}
        )
        if (
            response.status_code == 404
            and _signed(response)
            and self._error_code(response) == "ORDER_NOT_EXIST"
        ):
            return None
        if response.status_code != 200:
            raise self._refusal(response, "query")
        try:
            result = transaction_from_json(self._json(response, "query"))
            check_merchant(self._config, result)
        except NotificationError as exc:
            raise WxPayError("INVALID_RESPONSE", str(exc)) from exc
        if result.out_trade_no != out_trade_no:
            raise WxPayError("INVALID_RESPONSE", "query reply names another order")
        return result

    async def close_order(self, out_trade_no: str) -> None:
        """Close an unpaid order; closing an order that is already closed is not an error."""
        _check_out_trade_no(out_trade_no)
        path = f"/v3/pay/transactions/out-trade-no/{out_trade_no}/close"
        response = await self._call("POST", path, {"mchid": self._config.mchid}, "close")
        if response.status_code in (200, 204):
            return
        if _signed(response) and self._error_code(response) == "ORDER_CLOSED":
            return
        raise self._refusal(response, "close")

    # -- plumbing ------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        payload: Mapping[str, Any] | None,
        api: str,
        *,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """Send one signed request. A response comes back only if its signature verified,
        or if it is an error we will refuse anyway (those may arrive unsigned)."""
        body = b"" if payload is None else orjson.dumps(payload)
        headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if (key_id := self._config.public_key_id) is not None:
            # Public key mode: ask WeChat Pay to sign the reply with this key.
            headers["Wechatpay-Serial"] = key_id
        request = self._client.build_request(
            method, self._base + path, params=params, content=body, headers=headers
        )
        # Sign exactly the path and query that go on the wire (after httpx's encoding).
        target = request.url.raw_path.decode("ascii")
        request.headers["Authorization"] = build_authorization(
            self._config, method, target, body, timestamp=int(self._clock()), nonce=new_nonce()
        )
        try:
            response = await self._client.send(request)
        except httpx.TimeoutException as exc:
            _LOG.warning("wxpay %s: timeout", api)
            raise WxPayError("TIMEOUT", transient=True) from exc
        except httpx.HTTPError as exc:
            _LOG.warning("wxpay %s: transport error %s", api, type(exc).__name__)
            raise WxPayError("NETWORK_ERROR", type(exc).__name__, transient=True) from exc
        self._verify(response, api)
        return response

    def _verify(self, response: httpx.Response, api: str) -> None:
        if not _signed(response) and response.status_code >= 400:
            # e.g. 401 SIGN_ERROR may come unsigned: it becomes a WxPayError, and the
            # callers act on an error reply (404 -> None, ORDER_CLOSED -> done) only if signed.
            return
        try:
            verify_signature(
                self._config.platform_keys,
                response.headers,
                response.content,
                now=self._clock(),
                max_skew_s=self._max_skew_s,
            )
        except SignatureError as exc:
            _LOG.error("wxpay %s: reply signature rejected: %s", api, exc)
            raise WxPayError(
                "INVALID_SIGNATURE", str(exc), http_status=response.status_code
            ) from exc

    @staticmethod
    def _json(response: httpx.Response, api: str) -> dict[str, Any]:
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError as exc:
            raise WxPayError("INVALID_RESPONSE", f"{api} reply is not JSON") from exc
        if not isinstance(data, dict):
            raise WxPayError("INVALID_RESPONSE", f"{api} reply is not a JSON object")
        return data

    @staticmethod
    def _error_code(response: httpx.Response) -> str | None:
        try:
            data = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            return None
        code = data.get("code") if isinstance(data, dict) else None
        return code if isinstance(code, str) else None

    def _refusal(self, response: httpx.Response, api: str) -> WxPayError:
        status = response.status_code
        code, message = self._error_code(response) or f"HTTP_{status}", ""
        try:
            data = orjson.loads(response.content)
            if isinstance(data, dict) and isinstance(data.get("message"), str):
                message = data["message"]
        except orjson.JSONDecodeError:
            pass
        _LOG.warning("wxpay %s: HTTP %d %s", api, status, code)
        transient = status >= 500 or status == 429 or code in ("SYSTEM_ERROR", "FREQUENCY_LIMITED")
        return WxPayError(code, message, http_status=status, transient=transient)


def _signed(response: httpx.Response) -> bool:
    """True once ``_verify`` has passed a reply that carries a platform signature."""
    return "wechatpay-signature" in response.headers


@asynccontextmanager
async def open_wxpay_client(
    config: MerchantConfig,
    *,
    timeout_s: float,
    connect_timeout_s: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[WxPayClient]:
    client = WxPayClient(
        config, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s, transport=transport
    )
    try:
        yield client
    finally:
        await client.aclose()


async def post_notification(
    url: str, headers: Mapping[str, str], body: bytes, *, timeout_s: float = 10.0
) -> int:
    """POST a signed notification to ``url`` and return the HTTP status (the sandbox's
    default ``deliver``); 0 when the request never got a response."""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        try:
            response = await client.post(url, content=body, headers=dict(headers))
        except httpx.HTTPError as exc:
            _LOG.warning("sandbox notification not delivered: %s", type(exc).__name__)
            return 0
        return response.status_code
