"""The payment service: WeChat Pay Native orders, notifications and reconciliation.

Owns the path from a pending order to a paid one. A notification is verified (platform
signature, then AEAD decryption), checked against the order (amount, merchant), and
fulfilled through ``store.orders.fulfil_order``, whose guarded update makes replays and
concurrent deliveries fulfil exactly once. ``run`` is the reconciler: it expires pending
orders (closing them at WeChat Pay) and queries those whose notification is late.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import trio

from store.db import Database
from store.orders import (
    Order,
    expire_orders,
    fulfil_order,
    get_order,
    pending_wxpay_orders,
    set_code_url,
)
from store.plans import Plan, get_plan
from workers.errors import GatewayError
from workers.events import Events
from workers.wxpay import MerchantConfig, NotificationError, PaymentResult, parse_notification
from workers.wxpay_client import WxPayClient, WxPayError
from workers.wxpay_sandbox import SandboxWxPay, sandbox_config, sandbox_keys

log = logging.getLogger("airgate.payments")


SANDBOX_PREFIX = "/_sandbox/wxpay"
NOTIFY_PATH = "/api/payment/notify/wxpay"


class PaymentsUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "payments_unavailable"
    retryable = True


class PaymentFailed(GatewayError):
    status = 502
    type = "payment_error"
    code = "payment_provider_error"
    retryable = True


@dataclass(frozen=True, slots=True)
class NotifyOutcome:
    """What to answer WeChat Pay: ``status`` 204 (done, or a replay) or an error."""

    status: int
    message: str


class Payments:
    """WeChat Pay for the gateway: a real merchant, or the sandbox when none is configured.

    The sandbox needs the gateway's own URL (its fake WeChat Pay server is mounted in the
    gateway and notifies the gateway), which is known only once HTTP is listening: call
    ``bind`` then. Until bound, payment routes answer 503.
    """

    def __init__(
        self,
        db: Database,
        events: Events,
        merchant: MerchantConfig | None,
        *,
        rebate_percent: int,
        reconcile_interval_s: float,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        self._db = db
        self._events = events
        self._merchant = merchant
        self._rebate_percent = rebate_percent
        self._interval_s = reconcile_interval_s
        self._timeouts = (timeout_s, connect_timeout_s)
        self.sandbox = merchant is None
        self.sandbox_keys = sandbox_keys() if merchant is None else None
        self.sandbox_app: SandboxWxPay | None = None
        if self.sandbox_keys is not None:
            self.sandbox_app = SandboxWxPay(self.sandbox_keys, prefix=SANDBOX_PREFIX)
        self._config: MerchantConfig | None = None
        self._client_: WxPayClient | None = None
        self._bound = trio.Event()

    def bind(self, base_url: str) -> None:
        """Know where the gateway listens; opens the client (and the sandbox's config)."""
        if self.sandbox_keys is not None:
            base = base_url.rstrip("/")
            self._config = sandbox_config(self.sandbox_keys, base + NOTIFY_PATH,
                                          base + SANDBOX_PREFIX)
        else:
            self._config = self._merchant
        assert self._config is not None
        timeout_s, connect_s = self._timeouts
        self._client_ = WxPayClient(self._config, timeout_s=timeout_s,
                                    connect_timeout_s=connect_s)
        self._bound.set()

    async def aclose(self) -> None:
        if self._client_ is not None:
            await self._client_.aclose()

    @property
    def _client(self) -> WxPayClient:
        if self._client_ is None:
            raise PaymentsUnavailable("Payments are starting; retry shortly.",
                                      retry_after_s=1.0)
        return self._client_

    async def start(self, order: Order, plan: Plan) -> Order:
        """Open the Native order at WeChat Pay and keep its ``code_url``."""
        try:
            code_url = await self._client.create_native_order(
                order.id, f"airgate {plan.name}", order.amount_fen, order.expires_at)
        except WxPayError as exc:
            log.warning("creating WeChat Pay order %s failed: %s", order.id, exc)
            raise PaymentFailed("The payment provider refused the order; retry.") from exc
        await set_code_url(self._db, order.id, code_url)
        updated = await get_order(self._db, order.id)
        assert updated is not None
        return updated

    async def cancelled(self, order: Order) -> None:
        """Close a cancelled order at WeChat Pay so it can no longer be paid (best effort)."""
        if order.payment_method != "wxpay" or order.code_url is None:
            return
        try:
            await self._client.close_order(order.id)
        except WxPayError as exc:
            log.warning("closing WeChat Pay order %s failed: %s", order.id, exc)

    async def notified(self, headers: dict[str, str], body: bytes) -> NotifyOutcome:
        try:
            if self._config is None:
                return NotifyOutcome(503, "payments are starting")
            result = parse_notification(self._config, headers, body, now=time.time())
        except NotificationError as exc:
            log.warning("payment notification refused: %s", exc)
            return NotifyOutcome(401, "signature or payload not valid")
        return await self._settle(result)

    async def _settle(self, result: PaymentResult) -> NotifyOutcome:
        if result.trade_state != "SUCCESS":
            return NotifyOutcome(204, "not a success; nothing to do")
        order = await get_order(self._db, result.out_trade_no)
        if order is None:
            log.error("payment for unknown order %s", result.out_trade_no)
            return NotifyOutcome(404, "unknown order")
        if result.amount_total_fen != order.amount_fen:
            log.error("payment for order %s has amount %d, expected %d", order.id,
                      result.amount_total_fen, order.amount_fen)
            return NotifyOutcome(400, "amount does not match the order")
        plan = await get_plan(self._db, order.plan_id)
        if plan is None:
            return NotifyOutcome(500, "the order's plan is gone")
        done = await fulfil_order(self._db, order.id, plan,
                                  transaction_id=result.transaction_id,
                                  rebate_percent=self._rebate_percent)
        if done is not None and done.newly_paid:
            log.info("order %s paid", order.id)
            await self._events.user_changed(order.user_id)
        return NotifyOutcome(204, "ok")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reconcile forever: expire stale orders, query late ones."""
        task_status.started()
        next_tick = trio.current_time()
        await self._bound.wait()
        while True:
            next_tick += self._interval_s
            await trio.sleep_until(next_tick)
            try:
                await self.reconcile()
            except Exception:  # one failed round must not end reconciliation
                log.exception("payment reconciliation round failed")

    async def reconcile(self) -> None:
        for order in await pending_wxpay_orders(self._db, timedelta(seconds=self._interval_s)):
            await self._query(order)
        for order in await expire_orders(self._db):
            await self._query(order)  # paid at the last second? honour it
            await self.cancelled(order)

    async def _query(self, order: Order) -> None:
        try:
            result = await self._client.query_order(order.id)
        except WxPayError as exc:
            log.warning("querying WeChat Pay order %s failed: %s", order.id, exc)
            return
        if result is not None:
            await self._settle(result)

