"""Plans: the ``plans`` table. Prices in integer fen."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from store.db import Connection, Database


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    name: str
    price_fen: int
    token_limit: int
    duration_days: int
    model_groups: tuple[str, ...]
    status: str


_COLUMNS = "id, name, price_fen, token_limit, duration_days, model_groups, status"


def _plan(row: Mapping[str, Any]) -> Plan:
    return Plan(**{**dict(row), "model_groups": tuple(row["model_groups"])})


async def list_plans(db: Database) -> list[Plan]:
    return [_plan(r) for r in await db.fetch(f"SELECT {_COLUMNS} FROM plans ORDER BY price_fen")]


async def get_plan(db: Database | Connection, plan_id: str) -> Plan | None:
    row = await db.fetchrow(f"SELECT {_COLUMNS} FROM plans WHERE id = $1", plan_id)
    return None if row is None else _plan(row)


async def activate_plan(conn: Connection, user_id: str, plan: Plan) -> None:
    """Put the user on ``plan``: its period starts now or extends the current one.

    The plan's tokens are granted separately, as a ledger entry; tokens left from an
    earlier period are kept (the user paid for them).
    """
    await conn.execute(
        "UPDATE users SET plan = $2,"
        " expires_at = greatest(coalesce(expires_at, now()), now()) + make_interval(days => $3)"
        " WHERE id = $1",
        user_id, plan.id, plan.duration_days,
    )


async def upsert_plan(db: Database, plan: Plan) -> Plan:
    row = await db.fetchrow(
        f"INSERT INTO plans (id, name, price_fen, token_limit, duration_days, model_groups,"
        f" status) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO UPDATE SET"
        f" name = EXCLUDED.name, price_fen = EXCLUDED.price_fen,"
        f" token_limit = EXCLUDED.token_limit, duration_days = EXCLUDED.duration_days,"
        f" model_groups = EXCLUDED.model_groups, status = EXCLUDED.status"
        f" RETURNING {_COLUMNS}",
        plan.id, plan.name, plan.price_fen, plan.token_limit, plan.duration_days,
        list(plan.model_groups), plan.status,
    )
    assert row is not None
    return _plan(row)


async def retire_plan(db: Database, plan_id: str) -> bool:
    """Plans are referenced by orders: retiring hides them instead of deleting them."""
    result = await db.execute("UPDATE plans SET status = 'disabled' WHERE id = $1", plan_id)
    return result.endswith(" 1")
