"""Invites: who invited whom, the rebate they earned, and moving rebate into balance."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from store.db import Database
from store.ledger import Entry, InsufficientFunds, apply_entry


@dataclass(frozen=True, slots=True)
class InviteStats:
    invited: int
    paying: int  # invitees with at least one paid order
    rebate_earned_fen: int
    rebate_available_fen: int


@dataclass(frozen=True, slots=True)
class Invitee:
    email: str
    joined_at: datetime
    paid_orders: int


async def invite_stats(db: Database, user_id: str) -> InviteStats:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM users WHERE invited_by = $1) AS invited,"
        " (SELECT count(DISTINCT o.user_id) FROM orders o JOIN users u ON u.id = o.user_id"
        "   WHERE u.invited_by = $1 AND o.status = 'paid') AS paying,"
        " (SELECT coalesce(sum(delta_rebate_fen), 0) FROM ledger"
        "   WHERE user_id = $1 AND kind = 'rebate') AS earned,"
        " (SELECT rebate_fen FROM users WHERE id = $1) AS available",
        user_id,
    )
    assert row is not None
    return InviteStats(int(row["invited"]), int(row["paying"]), int(row["earned"]),
                       int(row["available"] or 0))


async def list_invitees(db: Database, user_id: str, limit: int = 200) -> list[Invitee]:
    rows = await db.fetch(
        "SELECT u.email, u.created_at,"
        " (SELECT count(*) FROM orders o WHERE o.user_id = u.id AND o.status = 'paid') AS paid"
        " FROM users u WHERE u.invited_by = $1 ORDER BY u.created_at DESC LIMIT $2",
        user_id, limit,
    )
    return [Invitee(r["email"], r["created_at"], int(r["paid"])) for r in rows]


async def transfer_rebate(
    db: Database, user_id: str, amount_fen: int | None, idempotency_key: str
) -> int:
    """Move ``amount_fen`` (None: all) of rebate into balance; returns the amount moved.

    ``InsufficientFunds`` when the rebate does not cover it, or there is none.
    """
    async with db.transaction() as conn:
        if amount_fen is None:
            amount_fen = int(await conn.fetchval(
                "SELECT rebate_fen FROM users WHERE id = $1", user_id) or 0)
        if amount_fen <= 0:
            raise InsufficientFunds(idempotency_key)
        await apply_entry(conn, Entry(
            user_id=user_id, kind="transfer", idempotency_key=idempotency_key,
            delta_rebate_fen=-amount_fen, delta_balance_fen=amount_fen,
        ))
        return amount_fen
