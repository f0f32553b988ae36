"""How account objects look on /api: one function per object, seed field names.

Money: integer fen in ``*_fen`` fields, plus the seed's CNY figure where the seed shows
one (``price``). Times: epoch seconds, as the seed's ``expiresAt``.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from store.orders import Order
from store.plans import Plan
from store.users import User


def cny(fen: int) -> float:
    return float(Decimal(fen) / 100)


def epoch(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def plan_view(plan: Plan) -> dict[str, Any]:
    return {
        "id": plan.id, "name": plan.name, "price": cny(plan.price_fen),
        "price_fen": plan.price_fen, "tokenLimit": plan.token_limit,
        "durationDays": plan.duration_days, "modelGroups": list(plan.model_groups),
        "status": plan.status,
    }


def order_view(order: Order) -> dict[str, Any]:
    return {
        "id": order.id, "orderId": order.id, "planId": order.plan_id,
        "paymentMethod": order.payment_method, "status": order.status,
        "amount": cny(order.amount_fen), "amount_fen": order.amount_fen,
        "code_url": order.code_url, "createdAt": epoch(order.created_at),
        "expiresAt": epoch(order.expires_at), "paidAt": epoch(order.paid_at),
    }


def me_view(user: User, token_used: int) -> dict[str, Any]:
    return {
        "id": user.id, "email": user.email, "role": user.role, "plan": user.plan,
        "tokenUsed": token_used, "tokenLimit": user.token_limit,
        "expiresAt": epoch(user.expires_at), "balance_fen": user.balance_fen,
        "rebate_fen": user.rebate_fen, "invite_code": user.invite_code,
        "status": user.status, "createdAt": epoch(user.created_at),
    }
