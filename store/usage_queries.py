"""Reading usage back: a user's request log, newest first."""

from __future__ import annotations

from typing import Any

from store.db import Database


async def usage_log(
    db: Database, user_id: str, *, offset: int, limit: int
) -> tuple[list[dict[str, Any]], int]:
    rows = await db.fetch(
        "SELECT request_id, created_at, model, endpoint, prompt_tokens, cached_tokens,"
        " completion_tokens, cost_micro, latency_ms, ttft_ms, status, usage_source"
        " FROM usage_records WHERE user_id = $1 ORDER BY created_at DESC, request_id DESC"
        " OFFSET $2 LIMIT $3",
        user_id, offset, limit,
    )
    total = await db.fetchval("SELECT count(*) FROM usage_records WHERE user_id = $1", user_id)
    return [dict(r) for r in rows], int(total)
