"""Quota leases: how much of a user's remaining tokens one gateway process may spend.

Owns the ``quota_leases`` table. ``acquire_lease`` grants a process up to ``want`` more
tokens, never more than the user's limit minus what is used and what other live leases
hold (the user row is locked for the decision, so concurrent grants cannot both take the
same tokens). Usage flushes shrink the flushing process's lease (``store.usage``).
"""

from __future__ import annotations

from datetime import timedelta

from store.db import Database

LEASE_TTL = timedelta(minutes=10)


async def acquire_lease(
    db: Database, user_id: str, holder: str, need: int, cap: int
) -> tuple[int, bool]:
    """Grant ``holder`` more tokens: at least ``need`` when that many are free, else all
    that is free; up to a quarter of what is free (at most ``cap``) to save round trips.

    Returns ``(granted, reset)``: ``reset`` when the holder's earlier lease had lapsed and
    no longer counts (the grant replaces it rather than adding to it).

    Grants for one user are serialised by a transaction-scoped advisory lock, and what is
    free is read in one statement (one snapshot: a usage flush that moves tokens from a
    lease into ``token_used`` is seen entirely or not at all). The user row itself is not
    locked, so a grant never waits on (or deadlocks with) a usage flush.
    """
    async with db.transaction() as conn:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('quota:' || $1))", user_id)
        row = await conn.fetchrow(
            "SELECT u.token_limit - u.token_used - coalesce(l.leased, 0) AS available,"
            " coalesce(l.mine, false) AS mine"
            " FROM users u LEFT JOIN LATERAL ("
            "   SELECT sum(tokens) AS leased, bool_or(holder = $2) AS mine"
            "   FROM quota_leases WHERE user_id = u.id AND renewed_at > now() - $3::interval"
            " ) l ON true WHERE u.id = $1",
            user_id, holder, LEASE_TTL,
        )
        if row is None:
            return 0, False
        available = int(row["available"])
        grant = max(0, min(available, max(need, min(available // 4, cap))))
        await conn.execute(
            "INSERT INTO quota_leases (user_id, holder, tokens) VALUES ($1, $2, $3)"
            " ON CONFLICT (user_id, holder) DO UPDATE SET"
            " tokens = CASE WHEN quota_leases.renewed_at > now() - $4::interval"
            "   THEN quota_leases.tokens ELSE 0 END + EXCLUDED.tokens,"
            " renewed_at = now()",
            user_id, holder, grant, LEASE_TTL,
        )
        return grant, not row["mine"]


async def lease_of(db: Database, user_id: str, holder: str) -> int:
    value = await db.fetchval(
        "SELECT tokens FROM quota_leases WHERE user_id = $1 AND holder = $2", user_id, holder)
    return int(value or 0)


async def return_lease(db: Database, user_id: str, holder: str, amount: int) -> None:
    """Give ``amount`` unspent tokens of a lease back (an idle user)."""
    await db.execute(
        "UPDATE quota_leases SET tokens = greatest(tokens - $3, 0)"
        " WHERE user_id = $1 AND holder = $2",
        user_id, holder, amount,
    )


async def release_leases(db: Database, holder: str) -> None:
    """Give back what ``holder`` did not spend (after its last usage flush)."""
    await db.execute("DELETE FROM quota_leases WHERE holder = $1", holder)
