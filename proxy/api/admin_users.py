"""Admin: system stats, the user list, and changes to one user (with ledger rows)."""

from __future__ import annotations

import secrets
from typing import Any

from quart import Blueprint, request

from proxy.api.common import current_admin, field, gateway, json_body, page_args, storable
from proxy.api.views import epoch
from store.admin_queries import search_users, totals
from store.ledger import Entry, InsufficientFunds, apply_entry
from store.users import get_user, set_status
from workers.errors import Conflict, InvalidRequest, NotFound

bp = Blueprint("admin_users", __name__, url_prefix="/api/admin")

_BIGINT = 2**62
_MAX_IDEMPOTENCY_KEY = 200


def _user_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"], "email": row["email"], "role": row["role"], "status": row["status"],
        "plan": row["plan"], "tokenLimit": row["token_limit"], "tokenUsed": row["token_used"],
        "requestCount": row["request_count"], "expiresAt": epoch(row["expires_at"]),
        "balance_fen": row["balance_fen"], "rebate_fen": row["rebate_fen"],
        "createdAt": epoch(row["created_at"]),
    }


@bp.get("/stats")
async def stats() -> dict[str, Any]:
    await current_admin()
    gw = gateway()
    found = await totals(gw.db)
    return {
        "users": found["users"], "activeUsers": found["active_users"],
        "requests": found["requests"], "tokens": found["tokens"],
        "revenue_fen": found["revenue_fen"], "paidOrders": found["paid_orders"],
        "pool": gw.pool.health_counts(),
    }


@bp.get("/users")
async def users() -> dict[str, Any]:
    await current_admin()
    page, limit = page_args()
    query = request.args.get("search") or request.args.get("q")
    if query is not None and (not storable(query) or len(query) > 320):
        raise InvalidRequest("'search' must be a short text without NUL.", param="search")
    rows, total = await search_users(gateway().db, query, offset=(page - 1) * limit,
                                     limit=limit)
    return {"users": [_user_row(r) for r in rows], "page": page, "limit": limit,
            "total": total}


@bp.get("/users/<user_id>")
async def user(user_id: str) -> dict[str, Any]:
    await current_admin()
    found = await get_user(gateway().db, user_id)
    if found is None:
        raise NotFound("No such user.")
    return {"user": _user_row({
        "id": found.id, "email": found.email, "role": found.role, "status": found.status,
        "plan": found.plan, "token_limit": found.token_limit, "token_used": found.token_used,
        "request_count": found.request_count, "expires_at": found.expires_at,
        "balance_fen": found.balance_fen, "rebate_fen": found.rebate_fen,
        "created_at": found.created_at,
    })}


def _delta(body: dict[str, Any], name: str) -> int:
    value = field(body, name, int, required=False) or 0
    if not -_BIGINT < value < _BIGINT:
        raise InvalidRequest(f"'{name}' is out of range.", param=name)
    return value


@bp.route("/users/<user_id>", methods=["PATCH", "PUT"])
async def change_user(user_id: str) -> dict[str, Any]:
    """Body: ``status`` (active|disabled), ``tokenLimit_delta``, ``balance_fen_delta``,
    optional ``note``; the ``Idempotency-Key`` header makes a retried adjustment a no-op."""
    admin = await current_admin()
    body = await json_body()
    gw = gateway()
    target = await get_user(gw.db, user_id)
    if target is None:
        raise NotFound("No such user.")
    status = field(body, "status", str, required=False)
    if status is not None and status not in ("active", "disabled"):
        raise InvalidRequest("'status' must be 'active' or 'disabled'.", param="status")
    if status == "disabled" and target.id == admin.id:
        raise Conflict("An administrator cannot disable their own account.")
    tokens, balance = _delta(body, "tokenLimit_delta"), _delta(body, "balance_fen_delta")
    note = field(body, "note", str, required=False)
    key = request.headers.get("idempotency-key") or secrets.token_hex(12)
    if len(key) > _MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest(f"'Idempotency-Key' is longer than {_MAX_IDEMPOTENCY_KEY}.")
    if tokens or balance:
        try:
            async with gw.db.transaction() as conn:
                await apply_entry(conn, Entry(
                    user_id=user_id, kind="admin_adjust", delta_tokens=tokens,
                    delta_balance_fen=balance, idempotency_key=f"admin:{user_id}:{key}",
                    ref=(note or f"by {admin.id}")[:200],
                ))
        except InsufficientFunds:
            raise Conflict("The adjustment would make the balance negative.") from None
    if status is not None:
        await set_status(gw.db, user_id, status)
    await gw.events.user_changed(user_id)
    return await user(user_id)


@bp.post("/users/<user_id>/disable")
async def disable(user_id: str) -> dict[str, Any]:
    return await _set(user_id, "disabled")


@bp.post("/users/<user_id>/enable")
async def enable(user_id: str) -> dict[str, Any]:
    return await _set(user_id, "active")


async def _set(user_id: str, status: str) -> dict[str, Any]:
    admin = await current_admin()
    if status == "disabled" and admin.id == user_id:
        raise Conflict("An administrator cannot disable their own account.")
    gw = gateway()
    if not await set_status(gw.db, user_id, status):
        raise NotFound("No such user.")
    await gw.events.user_changed(user_id)
    return await user(user_id)
