"""The admin CSV exports, streamed row by row (a page of rows at a time from Postgres).

Cells that a spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``,
tab or carriage return) are prefixed with ``'``; numbers are written as they are (``-3``
is no formula). Upstream secrets are masked.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any

from quart import Blueprint, Response

from proxy.api.common import current_admin, gateway
from store.admin_queries import paged_rows
from store.db import Database
from store.upstream_keys import masked_secret

bp = Blueprint("exports", __name__, url_prefix="/api/export")

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # a number is no formula: keep "-3" a number, not the text "'-3"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        value = " ".join(str(v) for v in value)
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _line(cells: Sequence[Any]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerow([neutralise(c) for c in cells])
    return buffer.getvalue().encode()


Transform = Callable[[dict[str, Any]], dict[str, Any]]


async def _stream(
    db: Database, table: str, columns: Sequence[str], key: str, transform: Transform | None
) -> AsyncIterator[bytes]:
    # Runs after the route has returned, outside Quart's app context: it must not call
    # ``gateway()``, so the database handle is passed in.
    yield _line(columns)
    async for page in paged_rows(db, table, columns, key):
        for row in page:
            if transform is not None:
                row = transform(row)
            yield _line([row[c] for c in columns])


async def _csv(
    name: str, table: str, columns: Sequence[str], key: str, transform: Transform | None = None
) -> Response:
    await current_admin()
    body = _stream(gateway().db, table, columns, key, transform)
    response = Response(body, mimetype="text/csv")
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    response.timeout = None  # a large export may take longer than the default
    return response


@bp.get("/users.csv")
async def users_csv() -> Response:
    return await _csv("users.csv", "users", (
        "id", "email", "role", "status", "plan", "token_limit", "token_used", "request_count",
        "balance_fen", "rebate_fen", "invited_by", "expires_at", "created_at"), "id")


@bp.get("/orders.csv")
async def orders_csv() -> Response:
    return await _csv("orders.csv", "orders", (
        "id", "user_id", "plan_id", "amount_fen", "payment_method", "status",
        "transaction_id", "created_at", "expires_at", "paid_at"), "id")


@bp.get("/usage.csv")
async def usage_csv() -> Response:
    return await _csv("usage.csv", "usage_records", (
        "request_id", "user_id", "api_key_id", "upstream_key_id", "model", "endpoint",
        "prompt_tokens", "cached_tokens", "completion_tokens", "cost_micro", "latency_ms",
        "ttft_ms", "status", "usage_source", "created_at"), "request_id")


def _mask_key(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "api_key": masked_secret(row["api_key"])}


@bp.get("/upstream_keys.csv")
async def upstream_keys_csv() -> Response:
    return await _csv("upstream_keys.csv", "upstream_keys", (
        "id", "name", "base_url", "api_key", "models", "weight", "priority", "rpm", "tpm",
        "max_concurrency", "status", "disabled_reason", "updated_at"), "id", _mask_key)
