"""GET /api/health: liveness plus the state of the database and the upstream pool."""

from __future__ import annotations

import time
from typing import Any

import trio
from quart import Blueprint

from proxy.api.common import gateway
from store.errors import StoreError

bp = Blueprint("health", __name__, url_prefix="/api")


@bp.get("/health")
async def health() -> tuple[dict[str, Any], int]:
    gw = gateway()
    database = "ok"
    with trio.move_on_after(2) as probe:
        try:
            await gw.db.fetchval("SELECT 1")
        except StoreError:
            database = "down"
    if probe.cancelled_caught:
        database = "down"
    counts = gw.pool.health_counts()
    usable = counts.get("healthy", 0) + counts.get("cooling", 0) + counts.get("half_open", 0)
    degraded = database != "ok" or (bool(gw.pool.actors) and usable == 0)
    body = {
        "status": "degraded" if degraded else "ok",
        "timestamp": int(time.time() * 1000),
        "database": database,
        "upstream": counts,
    }
    return body, 503 if database != "ok" else 200
