"""Upstream provider keys: the ``upstream_keys`` table.

The provider secret is read here only to hand it to the key actors; it never leaves in a
list, an export or an error (``masked_secret``). Imports ``store.db``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from store.db import Database
from store.ids import new_id


@dataclass(frozen=True, slots=True)
class UpstreamKey:
    id: str
    name: str
    base_url: str
    api_key: str = field(repr=False)
    models: tuple[str, ...]
    model_map: Mapping[str, str]
    weight: int
    priority: int
    rpm: int | None
    tpm: int | None
    max_concurrency: int
    status: str
    disabled_reason: str | None


def masked_secret(secret: str) -> str:
    return "****" if len(secret) < 12 else f"{secret[:3]}****{secret[-4:]}"


_COLUMNS = (
    "id, name, base_url, api_key, models, model_map, weight, priority, rpm, tpm,"
    " max_concurrency, status, disabled_reason"
)


def _key(row: Mapping[str, Any]) -> UpstreamKey:
    data = dict(row)
    data["models"] = tuple(data["models"])
    raw_map = data["model_map"]
    data["model_map"] = orjson.loads(raw_map) if isinstance(raw_map, (str, bytes)) else raw_map
    return UpstreamKey(**data)


async def list_upstream_keys(db: Database) -> list[UpstreamKey]:
    return [_key(r) for r in await db.fetch(f"SELECT {_COLUMNS} FROM upstream_keys ORDER BY id")]


async def get_upstream_key(db: Database, key_id: str) -> UpstreamKey | None:
    row = await db.fetchrow(f"SELECT {_COLUMNS} FROM upstream_keys WHERE id = $1", key_id)
    return None if row is None else _key(row)


# Columns an admin may set, with the SQL cast used for each.
EDITABLE: dict[str, str] = {
    "name": "text", "base_url": "text", "api_key": "text", "models": "text[]",
    "model_map": "jsonb", "weight": "int", "priority": "int", "rpm": "int", "tpm": "int",
    "max_concurrency": "int", "status": "text",
}


def _sql_value(column: str, value: Any) -> Any:
    if column == "model_map":
        return orjson.dumps(value).decode()
    if column == "models":
        return list(value)
    return value


async def create_upstream_key(db: Database, values: Mapping[str, Any]) -> UpstreamKey:
    columns = [c for c in EDITABLE if c in values]
    params = [_sql_value(c, values[c]) for c in columns]
    placeholders = ", ".join(f"${i + 2}::{EDITABLE[c]}" for i, c in enumerate(columns))
    row = await db.fetchrow(
        f"INSERT INTO upstream_keys (id, {', '.join(columns)}) VALUES ($1, {placeholders})"
        f" RETURNING {_COLUMNS}",
        new_id("uk"), *params,
    )
    assert row is not None
    return _key(row)


async def update_upstream_key(
    db: Database, key_id: str, values: Mapping[str, Any]
) -> UpstreamKey | None:
    columns = [c for c in EDITABLE if c in values]
    sets = [f"{c} = ${i + 2}::{EDITABLE[c]}" for i, c in enumerate(columns)]
    if "status" in values:
        sets.append("disabled_reason = NULL" if values["status"] == "active"
                    else "disabled_reason = 'disabled by admin'")
    sets.append("updated_at = now()")
    row = await db.fetchrow(
        f"UPDATE upstream_keys SET {', '.join(sets)} WHERE id = $1 RETURNING {_COLUMNS}",
        key_id, *[_sql_value(c, values[c]) for c in columns],
    )
    return None if row is None else _key(row)


async def disable_upstream_key(db: Database, key_id: str, reason: str) -> None:
    """Record an automatic disable (credential or quota failure) until an admin re-enables."""
    await db.execute(
        "UPDATE upstream_keys SET status = 'disabled', disabled_reason = $2, updated_at = now()"
        " WHERE id = $1 AND status = 'active'",
        key_id, reason,
    )


async def delete_upstream_key(db: Database, key_id: str) -> bool:
    result = await db.execute("DELETE FROM upstream_keys WHERE id = $1", key_id)
    return result.endswith(" 1")
