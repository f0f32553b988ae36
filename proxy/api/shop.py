"""Plans, orders, coupons and invites: the routes where money changes hands.

Every change goes through ``store`` functions that write a ledger row with an
idempotency key in the same transaction as the guarded update; afterwards the user's
in-memory quota is reloaded so the /v1 routes see it on the next request.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from quart import Blueprint

from proxy.api.common import current_user, field, gateway, json_body, text
from proxy.api.views import order_view, plan_view
from store.coupons import RedeemError, redeem
from store.invites import invite_stats, list_invitees, transfer_rebate
from store.ledger import InsufficientFunds
from store.orders import cancel_order, create_order, get_order, list_orders, pay_with_balance
from store.plans import get_plan, list_plans
from workers.errors import Conflict, GatewayError, InvalidRequest, NotFound

bp = Blueprint("shop", __name__, url_prefix="/api")


class PaymentRequired(GatewayError):
    status = 402
    type = "invalid_request_error"
    code = "insufficient_balance"


@bp.get("/plans")
async def plans() -> dict[str, Any]:
    return {"plans": [plan_view(p) for p in await list_plans(gateway().db)
                      if p.status == "active"]}


@bp.get("/plans/<plan_id>")
async def plan(plan_id: str) -> dict[str, Any]:
    found = await get_plan(gateway().db, plan_id)
    if found is None or found.status != "active":
        raise NotFound("No such plan.")
    return {"plan": plan_view(found)}


@bp.post("/orders/create")
async def create() -> tuple[dict[str, Any], int]:
    user = await current_user()
    body = await json_body()
    plan_id, method = text(body, "planId"), text(body, "paymentMethod")
    if method not in ("wxpay", "balance"):
        raise InvalidRequest("'paymentMethod' must be 'wxpay' or 'balance'.",
                             param="paymentMethod")
    gw = gateway()
    chosen = await get_plan(gw.db, plan_id)
    if chosen is None or chosen.status != "active":
        raise NotFound("No such plan.")
    if method == "balance":
        try:
            order = await pay_with_balance(gw.db, user.id, chosen)
        except InsufficientFunds:
            raise PaymentRequired("Your balance does not cover this plan.") from None
        await gw.events.user_changed(user.id)
        return {"order": order_view(order), "orderId": order.id}, 201
    order = await create_order(gw.db, user.id, chosen, "wxpay",
                               timedelta(seconds=gw.settings.order_ttl_s))
    order = await gw.payments.start(order, chosen)
    return {"order": order_view(order), "orderId": order.id, "code_url": order.code_url,
            "expires_in": gw.settings.order_ttl_s}, 201


@bp.get("/orders")
async def orders() -> dict[str, Any]:
    user = await current_user()
    return {"orders": [order_view(o) for o in await list_orders(gateway().db, user.id)]}


@bp.get("/orders/<order_id>")
async def order(order_id: str) -> dict[str, Any]:
    user = await current_user()
    found = await get_order(gateway().db, order_id)
    if found is None or found.user_id != user.id:
        raise NotFound("No such order.")
    return {"order": order_view(found)}


@bp.post("/orders/<order_id>/cancel")
async def cancel(order_id: str) -> dict[str, Any]:
    user = await current_user()
    gw = gateway()
    cancelled = await cancel_order(gw.db, user.id, order_id)
    if cancelled is None:
        found = await get_order(gw.db, order_id)
        if found is None or found.user_id != user.id:
            raise NotFound("No such order.")
        raise Conflict(f"Only a pending order can be cancelled; this one is {found.status}.")
    await gw.payments.cancelled(cancelled)
    return {"order": order_view(cancelled)}


_REDEEM_ERRORS: dict[str, tuple[type[GatewayError], str]] = {
    "not_found": (NotFound, "No such coupon code."),
    "expired": (Conflict, "This coupon code has expired."),
    "used_up": (Conflict, "This coupon code has been used up."),
    "already_redeemed": (Conflict, "You have already redeemed this coupon code."),
}


@bp.post("/coupon/redeem")
async def redeem_coupon() -> dict[str, Any]:
    user = await current_user()
    code = text(await json_body(), "code").strip()
    gw = gateway()
    try:
        coupon = await redeem(gw.db, code, user.id)
    except RedeemError as exc:
        kind, message = _REDEEM_ERRORS[exc.reason]
        raise kind(message, code=f"coupon_{exc.reason}") from None
    await gw.events.user_changed(user.id)
    return {"redeemed": True, "code": coupon.code, "kind": coupon.kind,
            "value": coupon.value, "planId": coupon.plan_id}


@bp.get("/invite/code")
async def invite_code() -> dict[str, Any]:
    user = await current_user()
    return {"invite_code": user.invite_code}


@bp.get("/invite/stats")
async def stats() -> dict[str, Any]:
    user = await current_user()
    found = await invite_stats(gateway().db, user.id)
    return {"invite_code": user.invite_code, "invited": found.invited,
            "paying": found.paying, "rebate_earned_fen": found.rebate_earned_fen,
            "rebate_available_fen": found.rebate_available_fen,
            "rebate_percent": gateway().settings.invite_rebate_percent}


def _mask(email: str) -> str:
    name, _, domain = email.partition("@")
    return f"{name[:2]}***@{domain}"


@bp.get("/invite/list")
async def invitees() -> dict[str, Any]:
    user = await current_user()
    return {"invitees": [
        {"email": _mask(i.email), "joinedAt": int(i.joined_at.timestamp()),
         "paidOrders": i.paid_orders}
        for i in await list_invitees(gateway().db, user.id)
    ]}


@bp.post("/invite/transfer")
async def transfer() -> dict[str, Any]:
    user = await current_user()
    try:
        body = await json_body()
    except InvalidRequest:
        body = {}
    amount = field(body, "amount_fen", int, required=False)
    if amount is not None and amount <= 0:
        raise InvalidRequest("'amount_fen' must be positive.", param="amount_fen")
    gw = gateway()
    try:
        moved = await transfer_rebate(gw.db, user.id, amount,
                                      f"transfer:{user.id}:{secrets.token_hex(8)}")
    except InsufficientFunds:
        raise Conflict("There is not enough rebate to transfer.") from None
    balances = await gw.db.fetchrow("SELECT balance_fen, rebate_fen FROM users WHERE id = $1",
                                    user.id)
    assert balances is not None
    return {"transferred_fen": moved, "balance_fen": balances["balance_fen"],
            "rebate_fen": balances["rebate_fen"]}
