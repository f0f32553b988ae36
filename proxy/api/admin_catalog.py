"""Admin: the model catalogue and prices, plans, and coupon codes."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from quart import Blueprint

from proxy.api.common import current_admin, field, gateway, json_body, text
from proxy.api.views import epoch, plan_view
from store.coupons import Coupon, create_coupon, delete_coupon, list_coupons
from store.errors import UniqueViolation
from store.models import delete_model, upsert_model
from store.plans import Plan, get_plan, list_plans, retire_plan, upsert_plan
from workers.errors import Conflict, InvalidRequest, NotFound
from workers.pricing import micro_to_price, price_to_micro

bp = Blueprint("admin_catalog", __name__, url_prefix="/api/admin")

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}$")
_INT32 = 2**31 - 1
_INT62 = 2**62
_MAX_EPOCH_S = 253_402_300_799  # 9999-12-31T23:59:59Z: the last second datetime can hold


def _id(body: dict[str, Any], name: str) -> str:
    value = text(body, name).strip()
    if not _ID.match(value):
        raise InvalidRequest(f"'{name}' must be 1-100 letters, digits or ._:/-", param=name)
    return value


def _int(body: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> int:
    value = field(body, name, int, required=default is None)
    if value is None:
        assert default is not None
        return default
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be within {low}..{high}.", param=name)
    return value


def _strings(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name, [])
    if not isinstance(value, list) or not all(
        isinstance(v, str) and 0 < len(v) <= 100 and "\x00" not in v for v in value
    ):
        raise InvalidRequest(f"'{name}' must be an array of short strings.", param=name)
    return value


def _price(body: dict[str, Any], name: str) -> int:
    raw = body.get(name, 0)
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise InvalidRequest(f"'{name}' must be a number (CNY per 1M tokens).", param=name)
    try:
        micro = price_to_micro(raw)
    except ValueError as exc:
        raise InvalidRequest(f"'{name}': {exc}", param=name) from None
    if micro > _INT62:
        raise InvalidRequest(f"'{name}' is too large.", param=name)
    return micro


async def _upsert_body(ident: str | None) -> tuple[dict[str, Any], str]:
    """The admin's body for a create-or-replace (the id from the path wins) and its
    validated ``status``."""
    await current_admin()
    body = await json_body()
    if ident is not None:
        body["id"] = ident
    status = body.get("status", "active")
    if status not in ("active", "disabled"):
        raise InvalidRequest("'status' must be 'active' or 'disabled'.", param="status")
    return body, status


# -- models ---------------------------------------------------------------------------


@bp.get("/models")
async def models() -> dict[str, Any]:
    await current_admin()
    return {"models": [
        {"id": m.id, "display_name": m.display_name, "group": m.model_group,
         "owned_by": m.owned_by, "status": m.status,
         "input_price": micro_to_price(m.input_price),
         "output_price": micro_to_price(m.output_price),
         "cached_price": micro_to_price(m.cached_price), "tags": list(m.tags)}
        for m in gateway().catalog.models.values()
    ]}


@bp.route("/models", methods=["POST"])
@bp.route("/models/<model_id>", methods=["PUT"])
async def put_model(model_id: str | None = None) -> tuple[dict[str, Any], int]:
    body, status = await _upsert_body(model_id)
    values: dict[str, Any] = {
        "id": _id(body, "id"), "display_name": text(body, "display_name")[:200],
        "model_group": (field(body, "group", str, required=False) or "")[:100],
        "owned_by": (field(body, "owned_by", str, required=False) or "")[:100],
        "input_price": _price(body, "input_price"), "output_price": _price(body, "output_price"),
        "cached_price": _price(body, "cached_price"), "tags": _strings(body, "tags"),
        "status": status,
    }
    gw = gateway()
    existed = values["id"] in gw.catalog.models
    await upsert_model(gw.db, **values)
    await gw.events.catalog_changed()
    view = {k: v for k, v in values.items() if k != "model_group"}
    view["group"] = values["model_group"]
    for name in ("input_price", "output_price", "cached_price"):
        view[name] = micro_to_price(values[name])
    return {"model": view}, 200 if existed else 201


@bp.delete("/models/<model_id>")
async def remove_model(model_id: str) -> dict[str, Any]:
    await current_admin()
    gw = gateway()
    if not await delete_model(gw.db, model_id):
        raise NotFound("No such model.")
    await gw.events.catalog_changed()
    return {"deleted": True}


# -- plans ----------------------------------------------------------------------------


@bp.get("/plans")
async def plans() -> dict[str, Any]:
    await current_admin()
    return {"plans": [plan_view(p) for p in await list_plans(gateway().db)]}


@bp.route("/plans", methods=["POST"])
@bp.route("/plans/<plan_id>", methods=["PUT"])
async def put_plan(plan_id: str | None = None) -> tuple[dict[str, Any], int]:
    body, status = await _upsert_body(plan_id)
    if "price_fen" in body:
        price_fen = _int(body, "price_fen", 0, _INT62)
    else:
        raw = body.get("price")
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise InvalidRequest("'price' (CNY) or 'price_fen' is required.", param="price")
        try:
            price_fen, finer = divmod(price_to_micro(raw), 10_000)
            if finer:
                raise ValueError("prices are whole fen")
        except ValueError as exc:
            raise InvalidRequest(f"'price': {exc}", param="price") from None
        if price_fen > _INT62:
            raise InvalidRequest("'price' is too large.", param="price")
    plan = Plan(
        id=_id(body, "id"), name=text(body, "name")[:200], price_fen=price_fen,
        token_limit=_int(body, "tokenLimit", 0, _INT62),
        duration_days=_int(body, "durationDays", 1, 3660),
        model_groups=tuple(_strings(body, "modelGroups")), status=status,
    )
    db = gateway().db
    existed = await get_plan(db, plan.id) is not None
    saved = await upsert_plan(db, plan)
    return {"plan": plan_view(saved)}, 200 if existed else 201


@bp.delete("/plans/<plan_id>")
async def remove_plan(plan_id: str) -> dict[str, Any]:
    await current_admin()
    if not await retire_plan(gateway().db, plan_id):
        raise NotFound("No such plan.")
    return {"retired": True}


# -- coupons --------------------------------------------------------------------------


def coupon_view(c: Coupon) -> dict[str, Any]:
    return {"code": c.code, "kind": c.kind, "value": c.value, "planId": c.plan_id,
            "maxUses": c.max_uses, "used": c.used, "expiresAt": epoch(c.expires_at)}


@bp.get("/coupons")
async def coupons() -> dict[str, Any]:
    await current_admin()
    return {"coupons": [coupon_view(c) for c in await list_coupons(gateway().db)]}


@bp.post("/coupons")
async def new_coupon() -> tuple[dict[str, Any], int]:
    await current_admin()
    body = await json_body()
    kind = text(body, "kind")
    if kind not in ("tokens", "balance", "plan"):
        raise InvalidRequest("'kind' must be tokens, balance or plan.", param="kind")
    plan_id = field(body, "planId", str, required=kind == "plan")
    value = _int(body, "value", 0, _INT62, default=0)
    if kind != "plan" and value <= 0:
        raise InvalidRequest("'value' must be positive.", param="value")
    db = gateway().db
    if kind == "plan" and await get_plan(db, plan_id or "") is None:
        raise InvalidRequest("'planId' names no plan.", param="planId")
    expires = field(body, "expiresAt", int, required=False)
    if expires is not None and not 0 <= expires <= _MAX_EPOCH_S:
        raise InvalidRequest("'expiresAt' must be epoch seconds before the year 10000.",
                             param="expiresAt")
    try:
        coupon = await create_coupon(
            db, code=_id(body, "code"), kind=kind, value=value,
            plan_id=plan_id if kind == "plan" else None,
            max_uses=_int(body, "maxUses", 1, _INT32, default=1),
            expires_at=None if expires is None else datetime.fromtimestamp(expires, UTC),
        )
    except UniqueViolation:
        raise Conflict("A coupon with this code exists.") from None
    return {"coupon": coupon_view(coupon)}, 201


@bp.delete("/coupons/<code>")
async def remove_coupon(code: str) -> dict[str, Any]:
    await current_admin()
    if not await delete_coupon(gateway().db, code):
        raise NotFound("No such unused coupon (a used one stays on record).")
    return {"deleted": True}
