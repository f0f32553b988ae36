"""The append-only ledger and the guarded balance changes it records.

Owns every change of a user's balance, rebate or token grant (except per-request usage,
which ``store.usage`` records by request id). Each change is one ledger row with an
idempotency key plus a conditional update of the user's counters, in the caller's
transaction: a replayed change is a no-op, and no balance can go below zero (the update's
guard, not a check made earlier, decides). Imports ``store.db``.
"""

from __future__ import annotations

from dataclasses import dataclass

from store.db import Connection, Database

Queryable = Database | Connection


class InsufficientFunds(Exception):
    """The change would take a balance, rebate or token limit below zero; nothing was
    written."""


@dataclass(frozen=True, slots=True)
class Entry:
    user_id: str
    kind: str  # payment, balance_payment, coupon, rebate, transfer, admin_adjust
    idempotency_key: str
    delta_balance_fen: int = 0
    delta_rebate_fen: int = 0
    delta_tokens: int = 0
    ref: str | None = None


async def apply_entry(conn: Connection, entry: Entry) -> bool:
    """Record ``entry`` and apply it; False when its key was applied before.

    Must run inside a transaction: on ``InsufficientFunds`` the caller's transaction is
    rolled back, taking the ledger row with it.
    """
    row_id = await conn.fetchval(
        "INSERT INTO ledger (user_id, kind, delta_balance_fen, delta_rebate_fen, delta_tokens,"
        " idempotency_key, ref) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
        entry.user_id, entry.kind, entry.delta_balance_fen, entry.delta_rebate_fen,
        entry.delta_tokens, entry.idempotency_key, entry.ref,
    )
    if row_id is None:
        return False
    updated = await conn.execute(
        "UPDATE users SET balance_fen = balance_fen + $2, rebate_fen = rebate_fen + $3,"
        " token_limit = token_limit + $4"
        " WHERE id = $1 AND balance_fen + $2 >= 0 AND rebate_fen + $3 >= 0"
        " AND token_limit + $4 >= 0",
        entry.user_id, entry.delta_balance_fen, entry.delta_rebate_fen, entry.delta_tokens,
    )
    if not updated.endswith(" 1"):
        raise InsufficientFunds(entry.idempotency_key)
    return True


async def ledger_totals(db: Queryable, user_id: str) -> tuple[int, int, int]:
    """Sums of the user's ledger rows: (balance_fen, rebate_fen, tokens)."""
    row = await db.fetchrow(
        "SELECT coalesce(sum(delta_balance_fen), 0) AS b, coalesce(sum(delta_rebate_fen), 0)"
        " AS r, coalesce(sum(delta_tokens), 0) AS t FROM ledger WHERE user_id = $1",
        user_id,
    )
    assert row is not None
    return int(row["b"]), int(row["r"]), int(row["t"])
