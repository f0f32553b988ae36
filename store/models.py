"""The model catalogue: the ``models`` table with prices in micro-CNY per 1M tokens."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from store.db import Database


@dataclass(frozen=True, slots=True)
class Model:
    id: str
    display_name: str
    model_group: str
    owned_by: str
    status: str
    input_price: int
    output_price: int
    cached_price: int
    tags: tuple[str, ...]
    created_at: datetime


_COLUMNS = (
    "id, display_name, model_group, owned_by, status, input_price, output_price,"
    " cached_price, tags, created_at"
)


async def list_models(db: Database) -> list[Model]:
    rows = await db.fetch(f"SELECT {_COLUMNS} FROM models ORDER BY model_group, id")
    return [Model(**{**dict(r), "tags": tuple(r["tags"])}) for r in rows]


async def upsert_model(
    db: Database,
    *,
    id: str,
    display_name: str,
    model_group: str,
    owned_by: str,
    input_price: int,
    output_price: int,
    cached_price: int,
    tags: list[str],
    status: str = "active",
) -> None:
    await db.execute(
        "INSERT INTO models (id, display_name, model_group, owned_by, status, input_price,"
        " output_price, cached_price, tags) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"
        " ON CONFLICT (id) DO UPDATE SET display_name = EXCLUDED.display_name,"
        " model_group = EXCLUDED.model_group, owned_by = EXCLUDED.owned_by,"
        " status = EXCLUDED.status, input_price = EXCLUDED.input_price,"
        " output_price = EXCLUDED.output_price, cached_price = EXCLUDED.cached_price,"
        " tags = EXCLUDED.tags",
        id, display_name, model_group, owned_by, status, input_price, output_price,
        cached_price, tags,
    )


async def delete_model(db: Database, model_id: str) -> bool:
    result = await db.execute("DELETE FROM models WHERE id = $1", model_id)
    return result.endswith(" 1")
