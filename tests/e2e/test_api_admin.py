"""The admin surface over real HTTP: admin login and the /api/admin/upstream-keys resource.

The provider secret is write-only: no response body ever carries it, and every change
reaches the running key pool without a restart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from store.users import set_status
from tests.e2e.conftest import (
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    MODELS,
    Harness,
    assert_api_error,
    bearer,
    eventually,
)

SECRET = "mock-healthy-0123456789-very-secret"
KEYS = "/api/admin/upstream-keys"
CHAT = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "hi there"}]}




class Admin:
    """An httpx client logged in as the configured admin; checks that no secret leaks."""

    def __init__(self, client: httpx.AsyncClient, token: str) -> None:
        self.client = client
        self.headers = bearer(token)
        self.secrets: set[str] = {SECRET}

    async def call(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                   **kwargs: Any) -> httpx.Response:
        response = await self.client.request(method, path,
                                             headers={**self.headers, **(headers or {})},
                                             **kwargs)
        for secret in self.secrets:
            assert secret not in response.text
        return response

    async def create(self, **values: Any) -> dict[str, Any]:
        response = await self.call("POST", KEYS, json=key_body(**values))
        assert response.status_code == 201, response.text
        data: dict[str, Any] = response.json()
        return data


def key_body(**values: Any) -> dict[str, Any]:
    return {"name": "primary", "base_url": values.pop("base_url"), "api_key": SECRET,
            "models": MODELS, **values}


@pytest.fixture
async def api(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=20.0) as client:
        yield client


@pytest.fixture
async def admin(api: httpx.AsyncClient) -> Admin:
    response = await api.post("/api/admin/login",
                              json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert response.status_code == 200, response.text
    return Admin(api, response.json()["token"])


# -- admin login ---------------------------------------------------------------------------


async def test_admin_login_returns_an_admin_session(api: httpx.AsyncClient) -> None:
    response = await api.post("/api/admin/login",
                              json={"email": ADMIN_EMAIL.upper(), "password": ADMIN_PASSWORD})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["user"]["role"] == "admin"
    assert data["user"]["email"] == ADMIN_EMAIL
    listed = await api.get(KEYS, headers=bearer(data["token"]))
    assert listed.status_code == 200, listed.text


async def test_admin_login_refuses_a_normal_user_with_403(api: httpx.AsyncClient) -> None:
    body = {"email": "user@example.com", "password": "user-password-1"}
    assert (await api.post("/api/auth/register", json=body)).status_code == 200
    response = await api.post("/api/admin/login", json=body)
    assert_api_error(response, 403)
    assert "token" not in response.text


async def test_admin_login_with_a_wrong_password_is_401(api: httpx.AsyncClient) -> None:
    wrong = await api.post("/api/admin/login",
                           json={"email": ADMIN_EMAIL, "password": "not-the-password"})
    unknown = await api.post("/api/admin/login",
                             json={"email": "ghost@example.com", "password": ADMIN_PASSWORD})
    assert assert_api_error(wrong, 401) == assert_api_error(unknown, 401)
    assert_api_error(await api.post("/api/admin/login", content=b"nope"), 400)


async def test_a_disabled_admin_loses_access(harness: Harness, admin: Admin) -> None:
    admin_id = await harness.gw.db.fetchval("SELECT id FROM users WHERE email = $1",
                                            ADMIN_EMAIL)
    await set_status(harness.gw.db, admin_id, "disabled")
    assert_api_error(await admin.call("GET", KEYS), 403)
    login = await admin.client.post("/api/admin/login",
                                    json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert_api_error(login, 403)


# -- upstream keys -------------------------------------------------------------------------


async def test_creating_an_upstream_key_masks_the_secret_and_starts_an_actor(
    harness: Harness, admin: Admin
) -> None:
    created = await admin.create(base_url=harness.mock_url, weight=3, priority=2, rpm=600,
                                 tpm=None, max_concurrency=4,
                                 model_map={"gpt-4o-mini": "deepseek-v4-flash"})
    assert set(created) >= {"id", "name", "base_url", "api_key", "models", "model_map",
                            "weight", "priority", "rpm", "tpm", "max_concurrency", "status",
                            "health"}
    assert created["api_key"] != SECRET
    assert "****" in created["api_key"]
    assert created["models"] == MODELS
    assert created["model_map"] == {"gpt-4o-mini": "deepseek-v4-flash"}
    assert (created["weight"], created["priority"], created["rpm"], created["tpm"],
            created["max_concurrency"]) == (3, 2, 600, None, 4)
    assert (created["status"], created["health"]) == ("active", "healthy")
    actor = harness.gw.pool.actors[created["id"]]
    assert actor.key.api_key == SECRET
    assert actor.key.weight == 3
    # The secret is stored for the actors, and the key serves traffic at once.
    stored = await harness.gw.db.fetchval("SELECT api_key FROM upstream_keys WHERE id = $1",
                                          created["id"])
    assert stored == SECRET
    _, sk = await harness.add_user()
    chat = await admin.client.post("/v1/chat/completions", headers=bearer(sk), json=CHAT)
    assert chat.status_code == 200, chat.text
    assert (await harness.mock_stats())["requests"] == {SECRET: 1}


async def test_create_applies_defaults_for_optional_fields(
    harness: Harness, admin: Admin
) -> None:
    created = await admin.create(base_url=harness.mock_url)
    assert created["model_map"] == {}
    assert created["weight"] == 1
    assert created["priority"] == 0
    assert created["rpm"] is None
    assert created["tpm"] is None
    assert created["max_concurrency"] > 0


BAD_KEYS: list[tuple[str, dict[str, Any], str]] = [
    ("name missing", {"name": None}, "name"),
    ("name empty", {"name": "  "}, "name"),
    ("name not a string", {"name": 3}, "name"),
    ("base_url missing", {"base_url": None}, "base_url"),
    ("base_url not a url", {"base_url": "localhost:9000"}, "base_url"),
    ("base_url wrong scheme", {"base_url": "ftp://example.com/v1"}, "base_url"),
    ("api_key missing", {"api_key": None}, "api_key"),
    ("api_key empty", {"api_key": ""}, "api_key"),
    ("api_key not a string", {"api_key": ["x"]}, "api_key"),
    ("models missing", {"models": None}, "models"),
    ("models not a list", {"models": "gpt-4o-mini"}, "models"),
    ("models with a number", {"models": ["gpt-4o-mini", 4]}, "models"),
    ("models with an empty id", {"models": [""]}, "models"),
    ("model_map not an object", {"model_map": ["a", "b"]}, "model_map"),
    ("model_map with a number", {"model_map": {"a": 1}}, "model_map"),
    ("weight zero", {"weight": 0}, "weight"),
    ("weight too big", {"weight": 10_001}, "weight"),
    ("weight a bool", {"weight": True}, "weight"),
    ("weight a float", {"weight": 1.5}, "weight"),
    ("weight a string", {"weight": "2"}, "weight"),
    ("priority a string", {"priority": "high"}, "priority"),
    ("priority beyond int32", {"priority": 2**31}, "priority"),
    ("rpm zero", {"rpm": 0}, "rpm"),
    ("rpm negative", {"rpm": -1}, "rpm"),
    ("rpm beyond int32", {"rpm": 2**31}, "rpm"),
    ("tpm a string", {"tpm": "lots"}, "tpm"),
    ("tpm beyond int32", {"tpm": 10**12}, "tpm"),
    ("max_concurrency zero", {"max_concurrency": 0}, "max_concurrency"),
    ("max_concurrency null", {"max_concurrency": None}, "max_concurrency"),
    ("status unknown", {"status": "paused"}, "status"),
    ("name with a NUL", {"name": "a\x00b"}, "name"),
    ("api_key with a NUL", {"api_key": "mock-healthy-\x00"}, "api_key"),
    ("base_url with a NUL", {"base_url": "http://example.com/\x00"}, "base_url"),
    ("models with a NUL", {"models": ["gpt\x00"]}, "models"),
    ("model_map with a NUL", {"model_map": {"a": "b\x00"}}, "model_map"),
]


def _without_nulls(body: dict[str, Any], keep: str) -> dict[str, Any]:
    """Drop fields set to None, except ``keep`` (a field whose null is the case itself)."""
    return {k: v for k, v in body.items() if v is not None or k == keep}


@pytest.mark.parametrize(("case", "override", "param"), BAD_KEYS, ids=[c[0] for c in BAD_KEYS])
async def test_create_refuses_each_bad_field_with_400(
    harness: Harness, admin: Admin, case: str, override: dict[str, Any], param: str
) -> None:
    keep = param if case.endswith("null") else ""
    body = _without_nulls({**key_body(base_url=harness.mock_url), **override}, keep)
    response = await admin.call("POST", KEYS, json=body)
    error = assert_api_error(response, 400)
    assert param in error["message"]
    assert await harness.gw.db.fetchval("SELECT count(*) FROM upstream_keys") == 0
    assert harness.gw.pool.actors == {}


@pytest.mark.parametrize(("case", "override", "param"),
                         [c for c in BAD_KEYS if not c[0].endswith("missing")],
                         ids=[c[0] for c in BAD_KEYS if not c[0].endswith("missing")])
async def test_update_refuses_each_bad_field_with_400_and_changes_nothing(
    harness: Harness, admin: Admin, case: str, override: dict[str, Any], param: str
) -> None:
    created = await admin.create(base_url=harness.mock_url)
    actor = harness.gw.pool.actors[created["id"]]
    response = await admin.call("PATCH", f"{KEYS}/{created['id']}", json=override)
    assert_api_error(response, 400)
    assert (await admin.call("GET", f"{KEYS}/{created['id']}")).json() == created
    assert harness.gw.pool.actors[created["id"]] is actor


@pytest.mark.parametrize("content", [b"", b"{bad", b"[]"], ids=["empty", "malformed", "array"])
async def test_create_refuses_a_body_that_is_not_a_json_object(
    harness: Harness, admin: Admin, content: bytes
) -> None:
    response = await admin.call("POST", KEYS, content=content,
                                headers={"content-type": "application/json"})
    assert_api_error(response, 400)


async def test_create_refuses_a_lone_surrogate_escape(harness: Harness, admin: Admin) -> None:
    body = (b'{"name": "\\udfff", "base_url": "' + harness.mock_url.encode()
            + b'", "api_key": "mock-healthy", "models": ["gpt-4o-mini"]}')
    response = await admin.call("POST", KEYS, content=body,
                                headers={"content-type": "application/json"})
    assert_api_error(response, 400)


async def test_list_and_get_show_every_key_masked(harness: Harness, admin: Admin) -> None:
    first = await admin.create(base_url=harness.mock_url, name="first")
    admin.secrets.add("mock-healthy-second-secret-value")
    second = await admin.create(base_url=harness.mock_url, name="second",
                                api_key="mock-healthy-second-secret-value")
    listed = await admin.call("GET", KEYS)
    assert listed.status_code == 200, listed.text
    by_id = {k["id"]: k for k in listed.json()["upstream_keys"]}
    assert by_id == {first["id"]: first, second["id"]: second}
    got = await admin.call("GET", f"{KEYS}/{second['id']}")
    assert got.status_code == 200, got.text
    assert got.json() == second
    assert_api_error(await admin.call("GET", f"{KEYS}/uk_missing"), 404)


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
async def test_updating_a_key_is_applied_to_the_running_pool(
    harness: Harness, admin: Admin, method: str
) -> None:
    created = await admin.create(base_url=harness.mock_url)
    path = f"{KEYS}/{created['id']}"
    response = await admin.call(method, path, json={"weight": 7, "priority": -3,
                                                     "models": ["gpt-4o-mini"]})
    assert response.status_code == 200, response.text
    updated = response.json()
    assert (updated["weight"], updated["priority"], updated["models"]) == \
        (7, -3, ["gpt-4o-mini"])
    assert updated["name"] == created["name"]  # fields not sent are kept
    actor = harness.gw.pool.actors[created["id"]]
    assert (actor.key.weight, actor.key.priority) == (7, -3)
    assert actor.serves("gpt-4o-mini")
    assert not actor.serves("deepseek-v4-flash")
    assert (await admin.call("GET", path)).json() == updated


async def test_a_new_secret_is_used_at_once_and_never_echoed(
    harness: Harness, admin: Admin
) -> None:
    created = await admin.create(base_url=harness.mock_url)
    rotated = "mock-healthy-rotated-secret-0042"
    admin.secrets.add(rotated)
    response = await admin.call("PATCH", f"{KEYS}/{created['id']}", json={"api_key": rotated})
    assert response.status_code == 200, response.text
    assert response.json()["api_key"].endswith(rotated[-4:])
    _, sk = await harness.add_user()
    chat = await admin.client.post("/v1/chat/completions", headers=bearer(sk), json=CHAT)
    assert chat.status_code == 200, chat.text
    assert (await harness.mock_stats())["requests"] == {rotated: 1}


async def test_disabling_a_key_takes_it_out_of_service_and_enabling_restores_it(
    harness: Harness, admin: Admin
) -> None:
    created = await admin.create(base_url=harness.mock_url)
    path = f"{KEYS}/{created['id']}"
    _, sk = await harness.add_user()

    disabled = await admin.call("PATCH", path, json={"status": "disabled"})
    assert disabled.status_code == 200, disabled.text
    assert (disabled.json()["status"], disabled.json()["health"]) == ("disabled", "disabled")
    assert (await admin.call("GET", path)).json()["health"] == "disabled"
    actor = harness.gw.pool.actors.get(created["id"])
    assert actor is None or actor.health.state(trio.current_time()).value == "disabled"
    refused = await admin.client.post("/v1/chat/completions", headers=bearer(sk), json=CHAT)
    assert refused.status_code == 503, refused.text
    assert (await harness.mock_stats())["requests"] == {}

    enabled = await admin.call("PUT", path, json={"status": "active"})
    assert enabled.status_code == 200, enabled.text
    assert (enabled.json()["status"], enabled.json()["health"]) == ("active", "healthy")
    assert enabled.json()["disabled_reason"] is None
    chat = await admin.client.post("/v1/chat/completions", headers=bearer(sk), json=CHAT)
    assert chat.status_code == 200, chat.text


async def test_deleting_a_key_stops_its_actor_and_it_is_gone(
    harness: Harness, admin: Admin
) -> None:
    created = await admin.create(base_url=harness.mock_url)
    path = f"{KEYS}/{created['id']}"
    response = await admin.call("DELETE", path)
    assert response.status_code == 200, response.text
    assert created["id"] not in harness.gw.pool.actors
    assert_api_error(await admin.call("GET", path), 404)
    assert_api_error(await admin.call("PATCH", path, json={"weight": 2}), 404)
    assert_api_error(await admin.call("DELETE", path), 404)
    assert (await admin.call("GET", KEYS)).json()["upstream_keys"] == []
    assert await harness.gw.db.fetchval("SELECT count(*) FROM upstream_keys") == 0


async def test_an_auto_disabled_key_shows_why(harness: Harness, admin: Admin) -> None:
    admin.secrets.add("mock-401-revoked-by-provider")
    created = await admin.create(base_url=harness.mock_url, api_key="mock-401-revoked-by-provider",
                                 priority=10)
    await admin.create(base_url=harness.mock_url, name="backup")
    _, sk = await harness.add_user()
    chat = await admin.client.post("/v1/chat/completions", headers=bearer(sk), json=CHAT)
    assert chat.status_code == 200, chat.text

    async def shown_disabled() -> bool:
        view = (await admin.call("GET", f"{KEYS}/{created['id']}")).json()
        return bool(view["status"] == "disabled" and view["health"] == "disabled")

    await eventually(shown_disabled)
    view = (await admin.call("GET", f"{KEYS}/{created['id']}")).json()
    assert view["disabled_reason"]
