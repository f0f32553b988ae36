"""The admin blueprint's login and the /api/admin/upstream-keys resource.

Every change is written to Postgres first, then applied to the running key pool (an
actor is started, replaced or stopped) without a restart. The provider secret is
write-only: it is never returned, only a masked form.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import trio
from quart import Blueprint

from proxy.api.auth import login_user, session_reply
from proxy.api.common import Forbidden, current_admin, gateway, json_body, storable
from store.upstream_keys import (
    UpstreamKey,
    create_upstream_key,
    delete_upstream_key,
    get_upstream_key,
    list_upstream_keys,
    masked_secret,
    update_upstream_key,
)
from workers.errors import InvalidRequest, NotFound

bp = Blueprint("admin_keys", __name__, url_prefix="/api/admin")


def key_view(key: UpstreamKey, health: str) -> dict[str, Any]:
    return {
        "id": key.id, "name": key.name, "base_url": key.base_url,
        "api_key": masked_secret(key.api_key), "models": list(key.models),
        "model_map": dict(key.model_map), "weight": key.weight, "priority": key.priority,
        "rpm": key.rpm, "tpm": key.tpm, "max_concurrency": key.max_concurrency,
        "status": key.status, "health": health, "disabled_reason": key.disabled_reason,
    }


def _health(key: UpstreamKey) -> str:
    if key.status != "active":
        return "disabled"
    actor = gateway().pool.actors.get(key.id)
    if actor is None:
        return "disabled"
    state = actor.health.state(trio.current_time()).value
    return {"half_open": "open"}.get(state, state)


# The columns are Postgres ``integer``: a larger value would fail in the driver (a 500).
_INT_MAX = 2**31 - 1


def _positive_or_null(body: dict[str, Any], name: str, out: dict[str, Any]) -> None:
    if name not in body:
        return
    value = body[name]
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or not 0 < value <= _INT_MAX):
        raise InvalidRequest(f"'{name}' must be a positive integer or null.", param=name)
    out[name] = value


def validate_key(body: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("name", "base_url", "api_key"):
        if name in body:
            value = body[name]
            if not isinstance(value, str) or not value.strip() or not storable(value):
                raise InvalidRequest(f"'{name}' must be a non-empty string.", param=name)
            out[name] = body[name].strip()
        elif creating:
            raise InvalidRequest(f"'{name}' is required.", param=name)
    if "base_url" in out:
        url = urlparse(out["base_url"])
        if url.scheme not in ("http", "https") or not url.netloc:
            raise InvalidRequest("'base_url' must be an http(s) URL.", param="base_url")
    if "models" in body:
        models = body["models"]
        if not isinstance(models, list) or not all(
            isinstance(m, str) and m and storable(m) for m in models
        ):
            raise InvalidRequest("'models' must be an array of model ids.", param="models")
        out["models"] = models
    elif creating:
        raise InvalidRequest("'models' is required.", param="models")
    if "model_map" in body:
        mapping = body["model_map"]
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and storable(k) and storable(v)
            for k, v in mapping.items()
        ):
            raise InvalidRequest("'model_map' must map model ids to model ids.",
                                 param="model_map")
        out["model_map"] = mapping
    for name in ("weight", "max_concurrency"):
        if name in body:
            value = body[name]
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 10_000:
                raise InvalidRequest(f"'{name}' must be an integer from 1 to 10000.", param=name)
            out[name] = value
    if "priority" in body:
        priority = body["priority"]
        if (not isinstance(priority, int) or isinstance(priority, bool)
                or not -_INT_MAX <= priority <= _INT_MAX):
            raise InvalidRequest("'priority' must be an integer.", param="priority")
        out["priority"] = body["priority"]
    _positive_or_null(body, "rpm", out)
    _positive_or_null(body, "tpm", out)
    if "status" in body:
        if body["status"] not in ("active", "disabled"):
            raise InvalidRequest("'status' must be 'active' or 'disabled'.", param="status")
        out["status"] = body["status"]
    return out


@bp.post("/login")
async def admin_login() -> dict[str, Any]:
    user = await login_user(await json_body())
    if user.role != "admin":
        raise Forbidden("This account is not an administrator.")
    return session_reply(user)


@bp.get("/upstream-keys")
async def list_keys() -> dict[str, Any]:
    await current_admin()
    keys = await list_upstream_keys(gateway().db)
    return {"upstream_keys": [key_view(k, _health(k)) for k in keys]}


@bp.post("/upstream-keys")
async def create_key() -> tuple[dict[str, Any], int]:
    await current_admin()
    values = validate_key(await json_body(), creating=True)
    gw = gateway()
    key = await create_upstream_key(gw.db, values)
    await gw.events.upstream_key_changed(key.id)
    return key_view(key, _health(key)), 201


@bp.get("/upstream-keys/<key_id>")
async def get_key(key_id: str) -> dict[str, Any]:
    await current_admin()
    key = await get_upstream_key(gateway().db, key_id)
    if key is None:
        raise NotFound("No such upstream key.")
    return key_view(key, _health(key))


@bp.route("/upstream-keys/<key_id>", methods=["PUT", "PATCH"])
async def update_key(key_id: str) -> dict[str, Any]:
    await current_admin()
    values = validate_key(await json_body(), creating=False)
    gw = gateway()
    key = await update_upstream_key(gw.db, key_id, values)
    if key is None:
        raise NotFound("No such upstream key.")
    await gw.events.upstream_key_changed(key.id)
    return key_view(key, _health(key))


@bp.delete("/upstream-keys/<key_id>")
async def delete_key(key_id: str) -> dict[str, Any]:
    await current_admin()
    gw = gateway()
    if not await delete_upstream_key(gw.db, key_id):
        raise NotFound("No such upstream key.")
    await gw.events.upstream_key_changed(key_id)
    return {"deleted": True}
