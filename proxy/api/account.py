"""Account routes beyond sign-in: /api/auth/me, password change, usage, models, export."""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from proxy.api.auth import check_password_shape
from proxy.api.common import Unauthorized, current_user, gateway, json_body, page_args, text
from proxy.api.views import cny, epoch, me_view, order_view
from store.orders import list_orders
from store.usage_queries import usage_log
from store.users import set_password
from workers.passwords import hash_password, verify_password
from workers.pricing import micro_to_price

bp = Blueprint("account", __name__, url_prefix="/api")


@bp.get("/auth/me")
async def me() -> dict[str, Any]:
    user = await current_user()
    used = gateway().accounts.used_tokens(user.id, user.token_used)
    return {"user": me_view(user, used)}


@bp.put("/auth/password")
async def change_password() -> dict[str, Any]:
    user = await current_user()
    body = await json_body()
    old, new = text(body, "oldPassword"), text(body, "newPassword")
    check_password_shape(new, "newPassword")
    if not await verify_password(old, user.password_hash):
        raise Unauthorized("The current password is not correct.")
    await set_password(gateway().db, user.id, await hash_password(new))
    return {"changed": True, "message": "Password changed; log in again."}


@bp.get("/usage/stats")
async def usage_stats() -> dict[str, Any]:
    user = await current_user()
    used = gateway().accounts.used_tokens(user.id, user.token_used)
    return {
        "tokenUsed": used, "tokenLimit": user.token_limit,
        "remaining": max(user.token_limit - used, 0), "requestCount": user.request_count,
        "plan": user.plan, "expiresAt": epoch(user.expires_at),
    }


def log_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["request_id"], "time": epoch(row["created_at"]), "model": row["model"],
        "endpoint": row["endpoint"], "prompt_tokens": row["prompt_tokens"],
        "cached_tokens": row["cached_tokens"], "completion_tokens": row["completion_tokens"],
        "cost": micro_to_price(row["cost_micro"]), "cost_micro": row["cost_micro"],
        "latency_ms": row["latency_ms"], "ttft_ms": row["ttft_ms"], "status": row["status"],
        "usage_source": row["usage_source"],
    }


@bp.get("/usage/log")
async def usage_log_route() -> dict[str, Any]:
    user = await current_user()
    page, limit = page_args()
    rows, total = await usage_log(gateway().db, user.id, offset=(page - 1) * limit,
                                  limit=limit)
    return {"logs": [log_view(r) for r in rows], "page": page, "limit": limit,
            "total": total}


@bp.get("/models")
async def models() -> dict[str, Any]:
    catalog = gateway().catalog
    return {"models": [
        {"id": m.id, "display_name": m.display_name, "group": m.model_group,
         "status": m.status, "input_price": micro_to_price(m.input_price),
         "output_price": micro_to_price(m.output_price),
         "cached_price": micro_to_price(m.cached_price), "tags": list(m.tags)}
        for m in catalog.models.values() if m.status == "active"
    ]}


@bp.get("/export/self")
async def export_self() -> dict[str, Any]:
    user = await current_user()
    gw = gateway()
    used = gw.accounts.used_tokens(user.id, user.token_used)
    rows, total = await usage_log(gw.db, user.id, offset=0, limit=10_000)
    orders = await list_orders(gw.db, user.id, limit=10_000)
    return {
        "user": me_view(user, used),
        "usage": {"tokenUsed": used, "tokenLimit": user.token_limit,
                  "requestCount": user.request_count,
                  "balance": cny(user.balance_fen), "balance_fen": user.balance_fen},
        "logs": [log_view(r) for r in rows], "logs_total": total,
        "orders": [order_view(o) for o in orders],
    }
