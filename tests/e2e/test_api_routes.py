"""Cross-cutting /api behaviour over real HTTP: who may call the admin routes (generated
from the app's own route table, so a new admin route that forgets its check fails here),
the health report, and JSON errors for unknown paths and methods.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest

from proxy.app import build_quart
from store.upstream_keys import update_upstream_key
from tests.e2e.conftest import Harness, bearer

PROTECTED_PREFIXES = ("/api/admin/", "/api/export/")
PUBLIC = {"/api/admin/login"}
# Under /api/export/ but any signed-in user's own data (API.md, account routes).
OWN_DATA = {"/api/export/self"}
_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")



def assert_json_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    assert "<html" not in response.text.lower()
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "code"}
    assert error["message"]
    assert error["code"]
    return dict(error)


def protected_calls(harness: Harness) -> list[tuple[str, str, int]]:
    """Every (method, concrete path, status for a normal user) of an admin or export
    route, path parameters filled with dummies."""
    calls = []
    for rule in build_quart(harness.gw).url_map.iter_rules():
        path = str(rule.rule)
        if not path.startswith(PROTECTED_PREFIXES) or path in PUBLIC:
            continue
        concrete = _PARAM.sub(lambda m: f"dummy-{m.group(1)}", path)
        user_status = 200 if path in OWN_DATA else 403
        calls.extend((method, concrete, user_status) for method in sorted(rule.methods or ())
                     if method not in ("HEAD", "OPTIONS"))
    return calls


@pytest.fixture
async def api(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=20.0) as client:
        yield client


# -- authorisation -------------------------------------------------------------------------


async def test_the_route_table_has_the_admin_routes_this_test_guards(harness: Harness) -> None:
    calls = protected_calls(harness)
    assert ("GET", "/api/admin/upstream-keys", 403) in calls
    assert ("DELETE", "/api/admin/upstream-keys/dummy-key_id", 403) in calls
    assert all(path != "/api/admin/login" for _, path, _ in calls)


async def test_every_admin_and_export_route_refuses_anonymous_and_normal_users(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    registered = await api.post("/api/auth/register",
                                json={"email": "plain@example.com", "password": "plain-pass-1"})
    assert registered.status_code == 200, registered.text
    user_token = registered.json()["token"]
    body = {"name": "x", "base_url": harness.mock_url, "api_key": "mock-healthy",
            "models": ["gpt-4o-mini"], "status": "disabled", "weight": 2}
    failures = []
    for method, path, user_status in protected_calls(harness):
        for who, headers, status in [("anonymous", {}, 401),
                                     ("normal user", bearer(user_token), user_status)]:
            response = await api.request(method, path, headers=headers, json=body)
            if response.status_code != status:
                failures.append(f"{method} {path} as {who}: {response.status_code}")
            elif status != 200:
                assert_json_error(response, status)
    assert failures == []
    # Nothing was changed by the refused calls.
    assert await harness.gw.db.fetchval("SELECT count(*) FROM upstream_keys") == 0


async def test_a_normal_users_token_with_a_forged_admin_role_claim_is_still_refused(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    registered = await api.post("/api/auth/register",
                                json={"email": "sneaky@example.com", "password": "sneaky-pass1"})
    user_id = registered.json()["user"]["id"]
    now = time.time()
    forged = jwt.encode({"sub": user_id, "role": "admin", "iat": now, "exp": int(now) + 600},
                        harness.gw.jwt_secret, algorithm="HS256")
    # Correctly signed (the secret leaked, say) but the role comes from the database.
    response = await api.get("/api/admin/upstream-keys", headers=bearer(forged))
    assert_json_error(response, 403)


# -- health --------------------------------------------------------------------------------


async def test_health_reports_ok_with_a_millisecond_timestamp(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    await harness.add_key()
    before = int(time.time() * 1000)
    response = await api.get("/api/health")
    after = int(time.time() * 1000)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["status"] == "ok"
    assert data["database"] == "ok"
    assert isinstance(data["timestamp"], int)
    assert before <= data["timestamp"] <= after
    assert data["upstream"]["healthy"] == 1
    assert all(isinstance(v, int) for v in data["upstream"].values())


async def test_health_is_ok_with_no_upstream_keys_yet(api: httpx.AsyncClient) -> None:
    response = await api.get("/api/health")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"
    assert sum(response.json()["upstream"].values()) == 0


async def test_health_is_degraded_when_every_upstream_key_is_disabled(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    key = await harness.add_key()
    updated = await update_upstream_key(harness.gw.db, key.id, {"status": "disabled"})
    assert updated is not None
    await harness.gw.pool.put(updated)
    response = await api.get("/api/health")
    data = response.json()
    assert data["status"] == "degraded"
    assert data["database"] == "ok"
    assert data["upstream"]["disabled"] == 1


# -- unknown paths and methods -------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/nope", "/api/auth/nope", "/api/admin/nope",
                                  "/api/admin/upstream-keys/a/b", "/nope", "/api"])
async def test_an_unknown_path_is_a_json_404(api: httpx.AsyncClient, path: str) -> None:
    assert_json_error(await api.get(path), 404)
    assert_json_error(await api.post(path, json={}), 404)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/auth/register"), ("PUT", "/api/auth/login"), ("GET", "/api/auth/apikey"),
    ("POST", "/api/auth/apikeys"), ("POST", "/api/health"), ("DELETE", "/api/admin/login"),
    ("PUT", "/api/admin/upstream-keys"),
])
async def test_a_wrong_method_is_a_json_405_naming_the_allowed_ones(
    api: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await api.request(method, path)
    assert_json_error(response, 405)
    assert response.headers.get("allow")


async def test_an_oversized_body_is_a_json_413(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    size = harness.gw.settings.max_body_bytes + 1
    body = b'{"email": "' + b"x" * size + b'"}'
    response = await api.post("/api/auth/login", content=body,
                              headers={"content-type": "application/json"})
    assert_json_error(response, 413)


async def test_a_deeply_nested_json_body_is_a_400_not_a_crash(api: httpx.AsyncClient) -> None:
    body = b'{"email": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = await api.post("/api/auth/register", content=body,
                              headers={"content-type": "application/json"})
    assert_json_error(response, 400)
