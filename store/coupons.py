"""Coupons and their redemption: never more redemptions than allowed, once per user.

Owns the ``coupons`` and ``coupon_redemptions`` tables. A redemption is one transaction:
a guarded increment of ``used`` (``used < max_uses``, not expired), the per-user
redemption row (its primary key refuses a second one), and the grant as a ledger entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from store.db import Database
from store.errors import UniqueViolation
from store.ledger import Entry, apply_entry
from store.plans import activate_plan, get_plan


@dataclass(frozen=True, slots=True)
class Coupon:
    code: str
    kind: str  # tokens | balance | plan
    value: int
    plan_id: str | None
    max_uses: int
    used: int
    expires_at: datetime | None
    created_at: datetime


_COLUMNS = "code, kind, value, plan_id, max_uses, used, expires_at, created_at"


def _coupon(row: Mapping[str, Any]) -> Coupon:
    return Coupon(**dict(row))


class RedeemError(Exception):
    """Why a code cannot be redeemed: ``reason`` is not_found, expired, used_up or
    already_redeemed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def create_coupon(
    db: Database, *, code: str, kind: str, value: int, plan_id: str | None, max_uses: int,
    expires_at: datetime | None,
) -> Coupon:
    row = await db.fetchrow(
        f"INSERT INTO coupons (code, kind, value, plan_id, max_uses, expires_at)"
        f" VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_COLUMNS}",
        code, kind, value, plan_id, max_uses, expires_at,
    )
    assert row is not None
    return _coupon(row)


async def list_coupons(db: Database) -> list[Coupon]:
    return [_coupon(r) for r in await db.fetch(
        f"SELECT {_COLUMNS} FROM coupons ORDER BY created_at DESC")]


async def delete_coupon(db: Database, code: str) -> bool:
    """Delete an unused coupon; a used one is kept for the record (expire it instead)."""
    result = await db.execute("DELETE FROM coupons WHERE code = $1 AND used = 0", code)
    return result.endswith(" 1")


async def redeem(db: Database, code: str, user_id: str) -> Coupon:
    """Redeem ``code`` for ``user_id`` and grant it; ``RedeemError`` says why not."""
    async with db.transaction() as conn:
        row = await conn.fetchrow(
            f"UPDATE coupons SET used = used + 1 WHERE code = $1 AND used < max_uses"
            f" AND (expires_at IS NULL OR expires_at > now()) RETURNING {_COLUMNS}",
            code,
        )
        if row is None:
            existing = await conn.fetchrow(f"SELECT {_COLUMNS} FROM coupons WHERE code = $1",
                                           code)
            if existing is None:
                raise RedeemError("not_found")
            coupon = _coupon(existing)
            expired = coupon.expires_at is not None and coupon.used < coupon.max_uses
            raise RedeemError("expired" if expired else "used_up")
        coupon = _coupon(row)
        try:
            await conn.execute(
                "INSERT INTO coupon_redemptions (code, user_id) VALUES ($1, $2)", code, user_id
            )
        except UniqueViolation:
            raise RedeemError("already_redeemed") from None
        key = f"coupon:{code}:{user_id}"
        if coupon.kind == "tokens":
            await apply_entry(conn, Entry(user_id, "coupon", key, delta_tokens=coupon.value,
                                          ref=code))
        elif coupon.kind == "balance":
            await apply_entry(conn, Entry(user_id, "coupon", key,
                                          delta_balance_fen=coupon.value, ref=code))
        else:
            plan = await get_plan(conn, coupon.plan_id or "")
            if plan is None:
                raise RedeemError("not_found")
            await apply_entry(conn, Entry(user_id, "coupon", key,
                                          delta_tokens=plan.token_limit, ref=code))
            await activate_plan(conn, user_id, plan)
        return coupon
