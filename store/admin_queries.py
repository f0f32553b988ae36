"""Read models for the admin console: user search, totals, and paged export rows."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from store.db import Database


def _like_literal(text: str) -> str:
    """``text`` matched literally by LIKE (whose escape character is a backslash)."""
    return text.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_")


async def search_users(
    db: Database, query: str | None, *, offset: int, limit: int
) -> tuple[list[dict[str, Any]], int]:
    pattern = None if not query else "%" + _like_literal(query.lower()) + "%"
    rows = await db.fetch(
        "SELECT id, email, role, status, plan, token_limit, token_used, request_count,"
        " expires_at, balance_fen, rebate_fen, created_at FROM users"
        " WHERE $1::text IS NULL OR email LIKE $1 ORDER BY created_at DESC, id DESC"
        " OFFSET $2 LIMIT $3",
        pattern, offset, limit,
    )
    total = await db.fetchval(
        "SELECT count(*) FROM users WHERE $1::text IS NULL OR email LIKE $1", pattern)
    return [dict(r) for r in rows], int(total)


async def totals(db: Database) -> dict[str, int]:
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM users) AS users,"
        " (SELECT count(DISTINCT user_id) FROM usage_records"
        "   WHERE created_at > now() - interval '24 hours') AS active_users,"
        " (SELECT coalesce(sum(request_count), 0) FROM users) AS requests,"
        " (SELECT coalesce(sum(token_used), 0) FROM users) AS tokens,"
        " (SELECT coalesce(sum(amount_fen), 0) FROM orders"
        "   WHERE status = 'paid' AND payment_method = 'wxpay') AS revenue_fen,"
        " (SELECT count(*) FROM orders WHERE status = 'paid') AS paid_orders"
    )
    assert row is not None
    return {k: int(v) for k, v in dict(row).items()}


async def paged_rows(
    db: Database, table: str, columns: Sequence[str], key: str, *, page_size: int = 1000
) -> AsyncIterator[list[dict[str, Any]]]:
    """Every row of ``table`` in pages ordered by the unique ``key`` (keyset paging), so an
    export streams without holding the table in memory. Names come from code, not input."""
    cols = ", ".join(columns)
    last: Any = None
    while True:
        rows = await db.fetch(
            f"SELECT {cols} FROM {table} WHERE $1::text IS NULL OR {key}::text > $1"
            f" ORDER BY {key}::text LIMIT $2",
            last, page_size,
        )
        if not rows:
            return
        yield [dict(r) for r in rows]
        last = str(rows[-1][key])
