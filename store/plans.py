"""Plans: the ``plans`` table. Prices in integer fen."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from store.db import Database


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


async def get_plan(db: Database, plan_id: str) -> Plan | None:
    row = await db.fetchrow(f"SELECT {_COLUMNS} FROM plans WHERE id = $1", plan_id)
    return None if row is None else _plan(row)
