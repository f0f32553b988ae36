"""The admin catalogue over real HTTP: models and prices (seen at once by /api/models,
/v1/models and the next request's bill), plans (retired, never deleted) and coupons."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Harness
from tests.e2e.test_api_admin_users import admin_login, api_error
from tests.e2e.test_api_shop import assert_ledger_matches, bearer, grant_balance, register
from workers.pricing import Prices, cost_micro

MODELS = "/api/admin/models"
PLANS = "/api/admin/plans"
COUPONS = "/api/admin/coupons"


@pytest.fixture
async def api(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=20.0) as client:
        yield client


@pytest.fixture
async def admin(api: httpx.AsyncClient) -> dict[str, str]:
    return await admin_login(api)


def model_body(**values: Any) -> dict[str, Any]:
    return {"id": "acme-large", "display_name": "Acme Large", "group": "Acme",
            "owned_by": "acme", "input_price": 1, "output_price": 3, "cached_price": 0.5,
            "tags": ["Acme", "chat"], **values}


def plan_body(**values: Any) -> dict[str, Any]:
    return {"id": "team_yearly", "name": "Team (yearly)", "price": 12.5,
            "tokenLimit": 1000, "durationDays": 365, "modelGroups": ["DeepSeek"], **values}


async def public_models(api: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in (await api.get("/api/models")).json()["models"]}


async def v1_models(api: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in (await api.get("/v1/models")).json()["data"]}


# -- models ---------------------------------------------------------------------------------


async def test_the_admin_model_list_shows_the_seeded_catalogue(
    api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    response = await api.get(MODELS, headers=admin)
    assert response.status_code == 200, response.text
    models = {m["id"]: m for m in response.json()["models"]}
    assert set(models) == {"deepseek-v4-flash", "gpt-4o-mini", "text-embedding-3-small"}
    assert models["deepseek-v4-flash"] == {
        "id": "deepseek-v4-flash", "display_name": "DeepSeek V4 Flash", "group": "DeepSeek",
        "owned_by": "deepseek", "status": "active", "input_price": 0.5, "output_price": 2.0,
        "cached_price": 0.25, "tags": ["DeepSeek"]}


async def test_a_created_model_is_listed_everywhere_at_once(
    api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    created = await api.post(MODELS, headers=admin, json=model_body())
    assert created.status_code == 201, created.text
    assert created.json()["model"] == {
        "id": "acme-large", "display_name": "Acme Large", "group": "Acme", "owned_by": "acme",
        "input_price": 1.0, "output_price": 3.0, "cached_price": 0.5,
        "tags": ["Acme", "chat"], "status": "active"}
    assert (await public_models(api))["acme-large"] == {
        "id": "acme-large", "display_name": "Acme Large", "group": "Acme", "status": "active",
        "input_price": 1.0, "output_price": 3.0, "cached_price": 0.5, "tags": ["Acme", "chat"]}
    listed = (await v1_models(api))["acme-large"]
    assert listed["pricing"] == {"input_price": 1.0, "output_price": 3.0, "cached_price": 0.5,
                                 "status": "active"}
    assert (listed["object"], listed["owned_by"], listed["display_name"]) == \
        ("model", "acme", "Acme Large")
    again = await api.post(MODELS, headers=admin, json=model_body(display_name="Acme L"))
    assert again.status_code == 200, again.text
    assert (await public_models(api))["acme-large"]["display_name"] == "Acme L"


async def test_a_new_price_is_shown_at_once_and_bills_the_next_request(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    await harness.add_key()
    user_id, sk = await harness.add_user()
    chat = {"model": "deepseek-v4-flash",
            "messages": [{"role": "user", "content": "one two three four five six seven"}]}
    first = await api.post("/v1/chat/completions", headers=bearer(sk), json=chat)
    assert first.status_code == 200, first.text
    await harness.wait_for_usage(user_id, 1)

    updated = await api.put(f"{MODELS}/deepseek-v4-flash", headers=admin, json={
        "display_name": "DeepSeek V4 Flash", "group": "DeepSeek", "owned_by": "deepseek",
        "input_price": 0.75, "output_price": "2.5", "cached_price": 0.125,
        "tags": ["DeepSeek"]})
    assert updated.status_code == 200, updated.text
    shown = (await public_models(api))["deepseek-v4-flash"]
    assert (shown["input_price"], shown["output_price"], shown["cached_price"]) == \
        (0.75, 2.5, 0.125)
    assert (await v1_models(api))["deepseek-v4-flash"]["pricing"]["output_price"] == 2.5

    second = await api.post("/v1/chat/completions", headers=bearer(sk), json=chat)
    assert second.status_code == 200, second.text
    rows = await harness.wait_for_usage(user_id, 2)
    old, new = Prices(500_000, 2_000_000, 250_000), Prices(750_000, 2_500_000, 125_000)
    for row, prices in zip(rows, (old, new), strict=True):
        assert (row["prompt_tokens"], row["completion_tokens"]) == (7, 20)
        assert row["cost_micro"] == cost_micro(prices, row["prompt_tokens"],
                                               row["cached_tokens"], row["completion_tokens"])
    assert (rows[0]["cost_micro"], rows[1]["cost_micro"]) == (44, 55)


async def test_a_disabled_or_deleted_model_is_hidden_and_refused(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    await harness.add_key()
    _, sk = await harness.add_user()
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    off = await api.put(f"{MODELS}/gpt-4o-mini", headers=admin,
                        json=model_body(id="ignored", display_name="GPT-4o mini",
                                        status="disabled"))
    assert off.status_code == 200, off.text
    assert off.json()["model"]["id"] == "gpt-4o-mini"  # the path names the model
    assert "gpt-4o-mini" not in await public_models(api)
    assert "gpt-4o-mini" not in await v1_models(api)
    refused = await api.post("/v1/chat/completions", headers=bearer(sk), json=chat)
    assert refused.status_code == 404, refused.text
    assert refused.json()["error"]["code"] == "model_not_found"
    admin_list = (await api.get(MODELS, headers=admin)).json()["models"]
    assert {m["id"]: m["status"] for m in admin_list}["gpt-4o-mini"] == "disabled"

    deleted = await api.delete(f"{MODELS}/deepseek-v4-flash", headers=admin)
    assert deleted.status_code == 200, deleted.text
    assert "deepseek-v4-flash" not in await public_models(api)
    assert "deepseek-v4-flash" not in await v1_models(api)
    gone = await api.post("/v1/chat/completions", headers=bearer(sk),
                          json={**chat, "model": "deepseek-v4-flash"})
    assert gone.status_code == 404, gone.text
    api_error(await api.delete(f"{MODELS}/deepseek-v4-flash", headers=admin), 404)
    api_error(await api.delete(f"{MODELS}/no-such-model", headers=admin), 404)


BAD_MODELS: list[tuple[str, dict[str, Any], str]] = [
    ("id missing", {"id": None}, "id"),
    ("id empty", {"id": ""}, "id"),
    ("id with a space", {"id": "acme large"}, "id"),
    ("id starting with a dash", {"id": "-acme"}, "id"),
    ("id too long", {"id": "a" * 101}, "id"),
    ("id not a string", {"id": 5}, "id"),
    ("display_name missing", {"display_name": None}, "display_name"),
    ("input_price negative", {"input_price": -1}, "input_price"),
    ("input_price NaN", {"input_price": "NaN"}, "input_price"),
    ("input_price Infinity", {"input_price": "Infinity"}, "input_price"),
    ("input_price too precise", {"input_price": 0.0000001}, "input_price"),
    ("output_price a word", {"output_price": "cheap"}, "output_price"),
    ("output_price a bool", {"output_price": True}, "output_price"),
    ("output_price a list", {"output_price": [1]}, "output_price"),
    ("cached_price huge", {"cached_price": 10**20}, "cached_price"),
    ("cached_price astronomically huge", {"cached_price": "1e999999999"}, "cached_price"),
    ("tags not a list", {"tags": "Acme"}, "tags"),
    ("tags with a number", {"tags": [1]}, "tags"),
    ("status unknown", {"status": "beta"}, "status"),
    ("group not a string", {"group": 7}, "group"),
]


@pytest.mark.parametrize(("case", "override", "param"), BAD_MODELS,
                         ids=[c[0] for c in BAD_MODELS])
async def test_bad_models_are_refused_with_400(
    api: httpx.AsyncClient, admin: dict[str, str], case: str, override: dict[str, Any],
    param: str,
) -> None:
    body = {k: v for k, v in model_body(**override).items() if v is not None}
    error = api_error(await api.post(MODELS, headers=admin, json=body), 400)
    assert param in error["message"]
    models = (await api.get(MODELS, headers=admin)).json()["models"]
    assert len(models) == 3


async def test_a_bad_price_update_changes_nothing(
    api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    before = await public_models(api)
    body = model_body(display_name="DeepSeek V4 Flash", input_price="-0.5")
    api_error(await api.put(f"{MODELS}/deepseek-v4-flash", headers=admin, json=body), 400)
    api_error(await api.put(f"{MODELS}/bad%20id", headers=admin, json=model_body()), 400)
    assert await public_models(api) == before


async def test_catalogue_changes_need_an_admin(api: httpx.AsyncClient) -> None:
    _, token = await register(api, "curious@airgate.test")
    for method, path in (("GET", MODELS), ("POST", MODELS), ("DELETE", f"{MODELS}/x"),
                         ("GET", PLANS), ("POST", PLANS), ("DELETE", f"{PLANS}/x"),
                         ("GET", COUPONS), ("POST", COUPONS), ("DELETE", f"{COUPONS}/x")):
        api_error(await api.request(method, path, headers=bearer(token), json={}), 403)
        api_error(await api.request(method, path, json={}), 401)


# -- plans ----------------------------------------------------------------------------------


async def test_a_created_plan_can_be_changed_and_bought(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    created = await api.post(PLANS, headers=admin, json=plan_body())
    assert created.status_code == 201, created.text
    assert created.json()["plan"] == {
        "id": "team_yearly", "name": "Team (yearly)", "price": 12.5, "price_fen": 1250,
        "tokenLimit": 1000, "durationDays": 365, "modelGroups": ["DeepSeek"],
        "status": "active"}
    public = (await api.get("/api/plans/team_yearly")).json()["plan"]
    assert public == created.json()["plan"]

    changed = await api.put(f"{PLANS}/team_yearly", headers=admin,
                            json=plan_body(id="ignored", price=None, price_fen=999,
                                           tokenLimit=2000))
    assert changed.status_code == 200, changed.text
    assert (changed.json()["plan"]["id"], changed.json()["plan"]["price"],
            changed.json()["plan"]["price_fen"]) == ("team_yearly", 9.99, 999)
    by_price = await api.put(f"{PLANS}/team_yearly", headers=admin,
                             json=plan_body(price="10.20", tokenLimit=2000))
    assert by_price.json()["plan"]["price_fen"] == 1020

    user_id, token = await register(api, "team@airgate.test")
    await grant_balance(harness.gw.db, user_id, 1500, "grant-team")
    bought = await api.post("/api/orders/create", headers=bearer(token),
                            json={"planId": "team_yearly", "paymentMethod": "balance"})
    assert bought.status_code == 201, bought.text
    assert bought.json()["order"]["amount_fen"] == 1020
    me = (await api.get("/api/auth/me", headers=bearer(token))).json()["user"]
    assert (me["plan"], me["tokenLimit"], me["balance_fen"]) == ("team_yearly", 2000, 480)
    await assert_ledger_matches(harness.gw.db, user_id)


async def test_a_retired_plan_is_hidden_and_cannot_be_bought(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    _, token = await register(api, "late@airgate.test")
    retired = await api.delete(f"{PLANS}/starter_monthly", headers=admin)
    assert retired.status_code == 200, retired.text
    assert "starter_monthly" not in {p["id"] for p in (await api.get("/api/plans")).json()
                                     ["plans"]}
    api_error(await api.get("/api/plans/starter_monthly"), 404)
    for method in ("wxpay", "balance"):
        api_error(await api.post("/api/orders/create", headers=bearer(token),
                                 json={"planId": "starter_monthly", "paymentMethod": method}),
                  404)
    admin_view = {p["id"]: p for p in (await api.get(PLANS, headers=admin)).json()["plans"]}
    assert admin_view["starter_monthly"]["status"] == "disabled"
    assert await harness.gw.db.fetchval("SELECT count(*) FROM orders") == 0
    api_error(await api.delete(f"{PLANS}/no_such_plan", headers=admin), 404)
    revived = await api.put(f"{PLANS}/starter_monthly", headers=admin, json=plan_body(
        name="Starter (monthly)", price=29, tokenLimit=5_000_000, durationDays=30,
        modelGroups=[]))
    assert revived.status_code == 200, revived.text
    assert "starter_monthly" in {p["id"] for p in (await api.get("/api/plans")).json()
                                 ["plans"]}


BAD_PLANS: list[tuple[str, dict[str, Any], str]] = [
    ("price missing", {"price": None}, "price"),
    ("price negative", {"price": -1}, "price"),
    ("price finer than a fen", {"price": 1.234}, "price"),
    ("price NaN", {"price": "NaN"}, "price"),
    ("price a bool", {"price": True}, "price"),
    ("price huge", {"price": 10**17}, "price"),
    ("price_fen negative", {"price_fen": -1}, "price_fen"),
    ("price_fen a string", {"price_fen": "100"}, "price_fen"),
    ("price_fen a float", {"price_fen": 1.5}, "price_fen"),
    ("price_fen huge", {"price_fen": 2**63}, "price_fen"),
    ("tokenLimit missing", {"tokenLimit": None}, "tokenLimit"),
    ("tokenLimit negative", {"tokenLimit": -5}, "tokenLimit"),
    ("durationDays zero", {"durationDays": 0}, "durationDays"),
    ("durationDays a string", {"durationDays": "30"}, "durationDays"),
    ("modelGroups not a list", {"modelGroups": "DeepSeek"}, "modelGroups"),
    ("modelGroups with an empty name", {"modelGroups": [""]}, "modelGroups"),
    ("id with a slash first", {"id": "/plan"}, "id"),
    ("name missing", {"name": None}, "name"),
    ("status unknown", {"status": "paused"}, "status"),
]


@pytest.mark.parametrize(("case", "override", "param"), BAD_PLANS,
                         ids=[c[0] for c in BAD_PLANS])
async def test_bad_plans_are_refused_with_400(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str], case: str,
    override: dict[str, Any], param: str,
) -> None:
    body = {k: v for k, v in plan_body(**override).items() if v is not None}
    error = api_error(await api.post(PLANS, headers=admin, json=body), 400)
    assert param in error["message"]
    assert await harness.gw.db.fetchval("SELECT count(*) FROM plans") == 3


# -- coupons --------------------------------------------------------------------------------


async def test_coupons_of_each_kind_are_created_listed_and_redeemed(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    bodies = [{"code": "TOK-1000", "kind": "tokens", "value": 1000},
              {"code": "CASH-500", "kind": "balance", "value": 500, "maxUses": 3},
              {"code": "PRO-FREE", "kind": "plan", "planId": "pro_monthly"}]
    for body in bodies:
        created = await api.post(COUPONS, headers=admin, json=body)
        assert created.status_code == 201, created.text
    listed = {c["code"]: c for c in (await api.get(COUPONS, headers=admin)).json()["coupons"]}
    assert listed["CASH-500"] == {"code": "CASH-500", "kind": "balance", "value": 500,
                                  "planId": None, "maxUses": 3, "used": 0,
                                  "expiresAt": None}
    assert (listed["PRO-FREE"]["planId"], listed["PRO-FREE"]["maxUses"]) == ("pro_monthly", 1)

    user_id, token = await register(api, "lucky@airgate.test")
    for code in ("TOK-1000", "CASH-500", "PRO-FREE"):
        redeemed = await api.post("/api/coupon/redeem", headers=bearer(token),
                                  json={"code": code})
        assert redeemed.status_code == 200, redeemed.text
    me = (await api.get("/api/auth/me", headers=bearer(token))).json()["user"]
    assert (me["plan"], me["tokenLimit"], me["balance_fen"]) == \
        ("pro_monthly", 1000 + 30_000_000, 500)
    await assert_ledger_matches(harness.gw.db, user_id)
    used = {c["code"]: c["used"] for c in (await api.get(COUPONS, headers=admin)).json()
            ["coupons"]}
    assert used == {"TOK-1000": 1, "CASH-500": 1, "PRO-FREE": 1}


async def test_max_uses_and_expiry_are_honoured(
    api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    now = int(time.time())
    for body in ({"code": "TWICE", "kind": "tokens", "value": 10, "maxUses": 2},
                 {"code": "SOON", "kind": "tokens", "value": 10, "maxUses": 5,
                  "expiresAt": now + 3600},
                 {"code": "GONE", "kind": "tokens", "value": 10, "maxUses": 5,
                  "expiresAt": now - 60}):
        created = await api.post(COUPONS, headers=admin, json=body)
        assert created.status_code == 201, created.text
        assert created.json()["coupon"]["expiresAt"] == body.get("expiresAt")
    tokens = [(await register(api, f"r{i}@airgate.test"))[1] for i in range(3)]

    async def redeem(token: str, code: str) -> httpx.Response:
        return await api.post("/api/coupon/redeem", headers=bearer(token), json={"code": code})

    statuses = [(await redeem(t, "TWICE")).status_code for t in tokens]
    assert statuses == [200, 200, 409]
    assert api_error(await redeem(tokens[2], "TWICE"), 409)["code"] == "coupon_used_up"
    assert (await redeem(tokens[0], "SOON")).status_code == 200
    assert api_error(await redeem(tokens[0], "GONE"), 409)["code"] == "coupon_expired"


async def test_only_an_unused_coupon_can_be_deleted(
    api: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    for code in ("FRESH", "SPENT"):
        await api.post(COUPONS, headers=admin, json={"code": code, "kind": "balance",
                                                     "value": 1, "maxUses": 9})
    _, token = await register(api, "spender@airgate.test")
    await api.post("/api/coupon/redeem", headers=bearer(token), json={"code": "SPENT"})
    deleted = await api.delete(f"{COUPONS}/FRESH", headers=admin)
    assert deleted.status_code == 200, deleted.text
    api_error(await api.post("/api/coupon/redeem", headers=bearer(token),
                             json={"code": "FRESH"}), 404)
    api_error(await api.delete(f"{COUPONS}/SPENT", headers=admin), 404)
    api_error(await api.delete(f"{COUPONS}/NEVER", headers=admin), 404)
    codes = {c["code"] for c in (await api.get(COUPONS, headers=admin)).json()["coupons"]}
    assert codes == {"SPENT"}


async def test_a_duplicate_code_is_409(api: httpx.AsyncClient, admin: dict[str, str]) -> None:
    body = {"code": "DUP", "kind": "tokens", "value": 5}
    assert (await api.post(COUPONS, headers=admin, json=body)).status_code == 201
    api_error(await api.post(COUPONS, headers=admin, json={**body, "value": 9}), 409)
    listed = (await api.get(COUPONS, headers=admin)).json()["coupons"]
    assert [(c["code"], c["value"]) for c in listed] == [("DUP", 5)]


BAD_COUPONS: list[tuple[str, dict[str, Any], str]] = [
    ("code missing", {"code": None}, "code"),
    ("code with a space", {"code": "TWO WORDS"}, "code"),
    ("kind unknown", {"kind": "discount"}, "kind"),
    ("kind missing", {"kind": None}, "kind"),
    ("value zero", {"value": 0}, "value"),
    ("value negative", {"value": -5}, "value"),
    ("value a string", {"value": "5"}, "value"),
    ("value a bool", {"value": True}, "value"),
    ("value huge", {"value": 2**63}, "value"),
    ("plan without planId", {"kind": "plan", "value": None}, "planId"),
    ("plan with an unknown planId", {"kind": "plan", "planId": "nope"}, "planId"),
    ("maxUses zero", {"maxUses": 0}, "maxUses"),
    ("maxUses beyond int32", {"maxUses": 2**31}, "maxUses"),
    ("expiresAt a string", {"expiresAt": "tomorrow"}, "expiresAt"),
    ("expiresAt a float", {"expiresAt": 1.5}, "expiresAt"),
    ("expiresAt far beyond any calendar", {"expiresAt": 10**15}, "expiresAt"),
    ("expiresAt negative", {"expiresAt": -(10**12)}, "expiresAt"),
]


@pytest.mark.parametrize(("case", "override", "param"), BAD_COUPONS,
                         ids=[c[0] for c in BAD_COUPONS])
async def test_bad_coupons_are_refused_with_400(
    harness: Harness, api: httpx.AsyncClient, admin: dict[str, str], case: str,
    override: dict[str, Any], param: str,
) -> None:
    body = {k: v for k, v in {"code": "C-1", "kind": "tokens", "value": 5, **override}.items()
            if v is not None}
    error = api_error(await api.post(COUPONS, headers=admin, json=body), 400)
    assert param in error["message"]
    assert await harness.gw.db.fetchval("SELECT count(*) FROM coupons") == 0
