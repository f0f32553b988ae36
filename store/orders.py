"""Orders and their fulfilment: the one place a plan is bought.

Owns the ``orders`` table. Fulfilment is a guarded conditional update
(``... WHERE status <> 'paid'``) in one transaction with the plan activation and the
ledger rows, so a replayed or concurrent payment notification fulfils exactly once.
Imports ``store.db``, ``store.ledger``, ``store.plans``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from store.db import Connection, Database
from store.ids import new_id
from store.ledger import Entry, apply_entry
from store.plans import Plan, activate_plan


@dataclass(frozen=True, slots=True)
class Order:
    id: str
    user_id: str
    plan_id: str
    amount_fen: int
    payment_method: str
    status: str
    code_url: str | None
    transaction_id: str | None
    created_at: datetime
    expires_at: datetime
    paid_at: datetime | None


_COLUMNS = (
    "id, user_id, plan_id, amount_fen, payment_method, status, code_url, transaction_id,"
    " created_at, expires_at, paid_at"
)


def _order(row: Mapping[str, Any] | None) -> Order | None:
    return None if row is None else Order(**dict(row))


async def create_order(
    db: Database, user_id: str, plan: Plan, method: str, ttl: timedelta
) -> Order:
    row = await db.fetchrow(
        f"INSERT INTO orders (id, user_id, plan_id, amount_fen, payment_method, expires_at)"
        f" VALUES ($1, $2, $3, $4, $5, now() + $6) RETURNING {_COLUMNS}",
        new_id("ord"), user_id, plan.id, plan.price_fen, method, ttl,
    )
    order = _order(row)
    assert order is not None
    return order


async def get_order(db: Database | Connection, order_id: str) -> Order | None:
    return _order(await db.fetchrow(f"SELECT {_COLUMNS} FROM orders WHERE id = $1", order_id))


async def list_orders(db: Database, user_id: str, limit: int = 100) -> list[Order]:
    rows = await db.fetch(
        f"SELECT {_COLUMNS} FROM orders WHERE user_id = $1 ORDER BY created_at DESC LIMIT $2",
        user_id, limit,
    )
    return [o for o in (_order(r) for r in rows) if o is not None]


async def set_code_url(db: Database, order_id: str, code_url: str) -> None:
    await db.execute("UPDATE orders SET code_url = $2 WHERE id = $1", order_id, code_url)


async def cancel_order(db: Database, user_id: str, order_id: str) -> Order | None:
    """Cancel a pending order of ``user_id``; None when it is not theirs or not pending."""
    return _order(await db.fetchrow(
        f"UPDATE orders SET status = 'cancelled' WHERE id = $1 AND user_id = $2"
        f" AND status = 'pending' RETURNING {_COLUMNS}",
        order_id, user_id,
    ))


async def expire_orders(db: Database) -> list[Order]:
    """Mark pending orders past their expiry as expired; return them (to close upstream)."""
    rows = await db.fetch(
        f"UPDATE orders SET status = 'expired' WHERE status = 'pending' AND expires_at <= now()"
        f" RETURNING {_COLUMNS}"
    )
    return [o for o in (_order(r) for r in rows) if o is not None]


async def pending_wxpay_orders(db: Database, older_than: timedelta) -> list[Order]:
    rows = await db.fetch(
        f"SELECT {_COLUMNS} FROM orders WHERE status = 'pending' AND payment_method = 'wxpay'"
        f" AND created_at <= now() - $1::interval ORDER BY created_at LIMIT 100",
        older_than,
    )
    return [o for o in (_order(r) for r in rows) if o is not None]


@dataclass(frozen=True, slots=True)
class Fulfilment:
    order: Order
    newly_paid: bool  # False: it had been fulfilled before (a replay)
    inviter_id: str | None


async def fulfil_order(
    db: Database,
    order_id: str,
    plan: Plan,
    *,
    transaction_id: str | None,
    rebate_percent: int,
) -> Fulfilment | None:
    """Mark the order paid and grant its plan, exactly once; None for an unknown order.

    A payment that arrives after the order expired or was cancelled is still honoured:
    the money has been taken.
    """
    async with db.transaction() as conn:
        row = await conn.fetchrow(
            f"UPDATE orders SET status = 'paid', paid_at = now(), transaction_id = $2"
            f" WHERE id = $1 AND status <> 'paid' RETURNING {_COLUMNS}",
            order_id, transaction_id,
        )
        if row is None:
            existing = await get_order(conn, order_id)
            if existing is None:
                return None
            return Fulfilment(existing, False, None)
        order = _order(row)
        assert order is not None
        await _grant(conn, order, plan, kind="payment", delta_balance=0)
        inviter = await conn.fetchval("SELECT invited_by FROM users WHERE id = $1",
                                      order.user_id)
        rebate = order.amount_fen * rebate_percent // 100
        if inviter is not None and rebate > 0:
            await apply_entry(conn, Entry(
                user_id=inviter, kind="rebate", delta_rebate_fen=rebate,
                idempotency_key=f"order:{order.id}:rebate", ref=order.id,
            ))
        return Fulfilment(order, True, inviter)


async def _grant(
    conn: Connection, order: Order, plan: Plan, *, kind: str, delta_balance: int
) -> None:
    await apply_entry(conn, Entry(
        user_id=order.user_id, kind=kind, delta_balance_fen=delta_balance,
        delta_tokens=plan.token_limit, idempotency_key=f"order:{order.id}:grant",
        ref=order.id,
    ))
    await activate_plan(conn, order.user_id, plan)


async def pay_with_balance(db: Database, user_id: str, plan: Plan) -> Order:
    """Create and pay an order from the balance in one transaction.

    ``InsufficientFunds`` when the balance does not cover it (nothing is written).
    """
    async with db.transaction() as conn:
        row = await conn.fetchrow(
            f"INSERT INTO orders (id, user_id, plan_id, amount_fen, payment_method, status,"
            f" expires_at, paid_at) VALUES ($1, $2, $3, $4, 'balance', 'paid', now(), now())"
            f" RETURNING {_COLUMNS}",
            new_id("ord"), user_id, plan.id, plan.price_fen,
        )
        order = _order(row)
        assert order is not None
        await _grant(conn, order, plan, kind="balance_payment", delta_balance=-plan.price_fen)
        return order

