"""The /api/auth routes over real HTTP: register, login, session tokens and sk- API keys."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest

from proxy.sessions import issue_token
from store.users import get_user_by_email, set_password, set_status
from tests.e2e.conftest import Harness, assert_api_error, bearer

PASSWORD = "correct-horse-1"
CHAT = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "hi there"}]}




async def register(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD, **extra: Any
) -> dict[str, Any]:
    response = await client.post("/api/auth/register",
                                 json={"email": email, "password": password, **extra})
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


@pytest.fixture
async def api(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=20.0) as client:
        yield client


# -- register ------------------------------------------------------------------------------


async def test_register_returns_a_working_session_and_stores_a_hashed_password(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    data = await register(api, "  Alice@Example.COM ")
    assert set(data) == {"token", "user"}
    user = data["user"]
    assert set(user) == {"id", "email", "role"}
    assert user["email"] == "alice@example.com"
    assert user["role"] == "user"
    assert user["id"].startswith("u_")
    stored = await get_user_by_email(harness.gw.db, "alice@example.com")
    assert stored is not None
    assert stored.id == user["id"]
    assert stored.invited_by is None
    assert PASSWORD not in stored.password_hash
    # The token is a session for this user: it can mint an API key.
    response = await api.post("/api/auth/apikey", headers=bearer(data["token"]))
    assert response.status_code == 200, response.text


async def test_register_with_a_taken_email_is_409_whatever_its_case(
    api: httpx.AsyncClient,
) -> None:
    await register(api, "bob@example.com")
    again = await api.post("/api/auth/register",
                           json={"email": "BOB@example.com", "password": "other-password"})
    assert assert_api_error(again, 409)["code"] == "conflict"


BAD_REGISTRATIONS: list[tuple[str, dict[str, Any]]] = [
    ("email without at", {"email": "not-an-email", "password": PASSWORD}),
    ("email without domain dot", {"email": "a@b", "password": PASSWORD}),
    ("email with spaces", {"email": "a b@example.com", "password": PASSWORD}),
    ("empty email", {"email": "", "password": PASSWORD}),
    ("short password", {"email": "c@example.com", "password": "short"}),
    ("huge password", {"email": "c@example.com", "password": "x" * 257}),
    ("missing email", {"password": PASSWORD}),
    ("missing password", {"email": "c@example.com"}),
    ("null password", {"email": "c@example.com", "password": None}),
    ("email not a string", {"email": 42, "password": PASSWORD}),
    ("password not a string", {"email": "c@example.com", "password": 12345678}),
    ("password a list", {"email": "c@example.com", "password": ["x"] * 9}),
    ("invite code not a string", {"email": "c@example.com", "password": PASSWORD,
                                  "invite_code": 7}),
    ("unknown invite code", {"email": "c@example.com", "password": PASSWORD,
                             "invite_code": "AIR-NOPE"}),
    ("email with a NUL", {"email": "c\x00d@example.com", "password": PASSWORD}),
    ("invite code with a NUL", {"email": "c@example.com", "password": PASSWORD,
                                "invite_code": "AIR-\x00"}),
]


@pytest.mark.parametrize(("case", "body"), BAD_REGISTRATIONS,
                         ids=[c[0] for c in BAD_REGISTRATIONS])
async def test_register_refuses_bad_fields_with_400_and_creates_nobody(
    harness: Harness, api: httpx.AsyncClient, case: str, body: dict[str, Any]
) -> None:
    response = await api.post("/api/auth/register", json=body)
    assert_api_error(response, 400)
    assert await harness.gw.db.fetchval("SELECT count(*) FROM users WHERE role = 'user'") == 0


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b'"text"', b"null"],
                         ids=["empty", "malformed", "array", "string", "null"])
async def test_register_refuses_a_body_that_is_not_a_json_object(
    api: httpx.AsyncClient, content: bytes
) -> None:
    response = await api.post("/api/auth/register", content=content,
                              headers={"content-type": "application/json"})
    assert_api_error(response, 400)


async def test_register_refuses_a_lone_surrogate_escape_instead_of_failing_in_the_database(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    body = b'{"email": "\\ud800x@example.com", "password": "correct-horse-1"}'
    response = await api.post("/api/auth/register", content=body,
                              headers={"content-type": "application/json"})
    assert_api_error(response, 400)
    login = await api.post("/api/auth/login", content=body,
                           headers={"content-type": "application/json"})
    assert_api_error(login, 400)


async def test_register_with_an_invite_code_records_the_inviter(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    inviter = await register(api, "inviter@example.com")
    code = await harness.gw.db.fetchval("SELECT invite_code FROM users WHERE id = $1",
                                        inviter["user"]["id"])
    invited = await register(api, "invited@example.com", invite_code=code.lower())
    invited_by = await harness.gw.db.fetchval("SELECT invited_by FROM users WHERE id = $1",
                                              invited["user"]["id"])
    assert invited_by == inviter["user"]["id"]


# -- login ---------------------------------------------------------------------------------


async def test_login_with_the_right_password_returns_a_session(
    api: httpx.AsyncClient,
) -> None:
    registered = await register(api, "carol@example.com")
    response = await api.post("/api/auth/login",
                              json={"email": "Carol@Example.com", "password": PASSWORD})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["user"] == registered["user"]
    assert (await api.get("/api/auth/apikeys", headers=bearer(data["token"]))).status_code == 200


async def test_login_wrong_password_and_unknown_email_look_the_same(
    api: httpx.AsyncClient,
) -> None:
    await register(api, "dave@example.com")
    wrong = await api.post("/api/auth/login",
                           json={"email": "dave@example.com", "password": "wrong-password"})
    unknown = await api.post("/api/auth/login",
                             json={"email": "nobody@example.com", "password": PASSWORD})
    assert assert_api_error(wrong, 401) == assert_api_error(unknown, 401)


@pytest.mark.parametrize("body", [{}, {"email": "e@example.com"}, {"password": PASSWORD},
                                  {"email": 1, "password": PASSWORD},
                                  {"email": "e\x00@example.com", "password": PASSWORD}],
                         ids=["empty", "no password", "no email", "email not a string",
                              "email with a NUL"])
async def test_login_with_missing_or_mistyped_fields_is_400(
    api: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    assert_api_error(await api.post("/api/auth/login", json=body), 400)


async def test_a_disabled_user_can_neither_log_in_nor_use_an_old_session(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    data = await register(api, "erin@example.com")
    await set_status(harness.gw.db, data["user"]["id"], "disabled")
    login = await api.post("/api/auth/login",
                           json={"email": "erin@example.com", "password": PASSWORD})
    assert_api_error(login, 403)
    assert_api_error(await api.post("/api/auth/apikey", headers=bearer(data["token"])), 403)
    assert_api_error(await api.get("/api/auth/apikeys", headers=bearer(data["token"])), 403)
    # A wrong password still says 401: a disabled account is not revealed without it.
    wrong = await api.post("/api/auth/login",
                           json={"email": "erin@example.com", "password": "wrong-password"})
    assert_api_error(wrong, 401)


# -- session tokens ------------------------------------------------------------------------


def _forged_tokens(harness: Harness, user_id: str) -> dict[str, str]:
    secret = harness.gw.jwt_secret
    return {
        "garbage": "not-a-jwt",
        "three dots": "a.b.c",
        "expired": issue_token(secret, user_id, "user", -60),
        "wrong signature": issue_token("another-secret-" + "y" * 32, user_id, "user", 600),
        "alg none": jwt.encode({"sub": user_id, "iat": 1, "exp": 4_000_000_000}, None,
                               algorithm="none"),
        "no expiry": jwt.encode({"sub": user_id, "iat": 4_000_000_000}, secret,
                                algorithm="HS256"),
        "unknown user": issue_token(secret, "u_doesnotexist", "user", 600),
    }


@pytest.mark.parametrize("kind", ["garbage", "three dots", "expired", "wrong signature",
                                  "alg none", "no expiry", "unknown user"])
async def test_a_bad_session_token_is_401(
    harness: Harness, api: httpx.AsyncClient, kind: str
) -> None:
    data = await register(api, "frank@example.com")
    token = _forged_tokens(harness, data["user"]["id"])[kind]
    for method, path in [("POST", "/api/auth/apikey"), ("GET", "/api/auth/apikeys"),
                         ("GET", "/api/admin/upstream-keys")]:
        response = await api.request(method, path, headers=bearer(token))
        assert_api_error(response, 401)


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer x y", "Basic abc", "Token x"])
async def test_a_missing_session_token_is_401(
    api: httpx.AsyncClient, header: str | None
) -> None:
    headers = {} if header is None else {"authorization": header}
    assert_api_error(await api.post("/api/auth/apikey", headers=headers), 401)


async def test_an_api_key_is_not_a_session_token(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    _, secret = await harness.add_user()
    assert_api_error(await api.get("/api/auth/apikeys", headers=bearer(secret)), 401)


async def test_a_password_change_ends_older_sessions(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    data = await register(api, "grace@example.com")
    await set_password(harness.gw.db, data["user"]["id"], "scrypt$replaced")
    assert_api_error(await api.get("/api/auth/apikeys", headers=bearer(data["token"])), 401)


# -- API keys ------------------------------------------------------------------------------


async def _give_quota(harness: Harness, user_id: str) -> None:
    await harness.gw.db.execute(
        "UPDATE users SET token_limit = 1000000, expires_at = now() + interval '1 day'"
        " WHERE id = $1", user_id)


async def test_a_new_api_key_is_shown_once_stored_hashed_and_works_on_v1(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    await harness.add_key()
    data = await register(api, "heidi@example.com")
    user_id = data["user"]["id"]
    await _give_quota(harness, user_id)
    response = await api.post("/api/auth/apikey", headers=bearer(data["token"]))
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"api_key"}
    secret = response.json()["api_key"]
    assert secret.startswith("sk-")
    assert len(secret) > 40

    rows = await harness.gw.db.fetch("SELECT * FROM api_keys WHERE user_id = $1", user_id)
    assert len(rows) == 1
    row = dict(rows[0])
    assert bytes(row["key_hash"]) == hashlib.sha256(secret.encode()).digest()
    assert all(secret not in str(value) for value in row.values())

    models = await api.get("/v1/models", headers=bearer(secret))
    assert models.status_code == 200, models.text
    assert "deepseek-v4-flash" in {m["id"] for m in models.json()["data"]}
    chat = await api.post("/v1/chat/completions", headers=bearer(secret), json=CHAT)
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]
    usage = await harness.wait_for_usage(user_id, 1)
    assert usage[0]["api_key_id"] == row["id"]


async def test_api_key_creation_accepts_an_optional_name(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    data = await register(api, "ivan@example.com")
    named = await api.post("/api/auth/apikey", headers=bearer(data["token"]),
                           json={"name": "laptop"})
    assert named.status_code == 200, named.text
    listed = (await api.get("/api/auth/apikeys", headers=bearer(data["token"]))).json()
    assert [k["name"] for k in listed["api_keys"]] == ["laptop"]
    for name in (5, "nul\x00byte"):
        bad = await api.post("/api/auth/apikey", headers=bearer(data["token"]),
                             json={"name": name})
        assert_api_error(bad, 400)


async def test_the_key_list_is_masked_and_only_the_callers(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    alice = await register(api, "judy@example.com")
    mallory = await register(api, "mallory@example.com")
    secrets = []
    for _ in range(2):
        response = await api.post("/api/auth/apikey", headers=bearer(alice["token"]))
        secrets.append(response.json()["api_key"])
    other = (await api.post("/api/auth/apikey", headers=bearer(mallory["token"]))).json()

    response = await api.get("/api/auth/apikeys", headers=bearer(alice["token"]))
    assert response.status_code == 200, response.text
    keys = response.json()["api_keys"]
    assert len(keys) == 2
    for secret in [*secrets, other["api_key"]]:
        assert secret not in response.text
        assert secret[3:-4] not in response.text
    for entry, secret in zip(keys, secrets, strict=True):
        assert set(entry) >= {"id", "name", "key", "created_at", "last_used_at"}
        assert entry["key"].startswith("sk-")
        assert entry["key"].endswith(secret[-4:])
        assert entry["key"] != secret
        assert isinstance(entry["created_at"], int)


async def test_revoking_a_key_refuses_it_on_the_very_next_request(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    data = await register(api, "ken@example.com")
    secret = (await api.post("/api/auth/apikey", headers=bearer(data["token"]))).json()["api_key"]
    assert (await api.get("/v1/models", headers=bearer(secret))).status_code == 200
    response = await api.request("DELETE", "/api/auth/apikey", headers=bearer(data["token"]),
                                 json={"api_key": secret})
    assert response.status_code == 200, response.text
    refused = await api.get("/v1/models", headers=bearer(secret))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    listed = (await api.get("/api/auth/apikeys", headers=bearer(data["token"]))).json()
    assert listed["api_keys"] == []
    again = await api.request("DELETE", "/api/auth/apikey", headers=bearer(data["token"]),
                              json={"api_key": secret})
    assert_api_error(again, 404)


async def test_revoking_someone_elses_key_is_404_and_leaves_it_working(
    harness: Harness, api: httpx.AsyncClient
) -> None:
    owner = await register(api, "laura@example.com")
    thief = await register(api, "mike@example.com")
    secret = (await api.post("/api/auth/apikey", headers=bearer(owner["token"]))).json()["api_key"]
    response = await api.request("DELETE", "/api/auth/apikey", headers=bearer(thief["token"]),
                                 json={"api_key": secret})
    assert_api_error(response, 404)
    assert (await api.get("/v1/models", headers=bearer(secret))).status_code == 200
    revoked = await harness.gw.db.fetchval(
        "SELECT revoked_at FROM api_keys WHERE user_id = $1", owner["user"]["id"])
    assert revoked is None


@pytest.mark.parametrize("body", [{}, {"api_key": 5}, None], ids=["empty", "not a string",
                                                                   "no body"])
async def test_revoking_without_a_key_string_is_400(
    api: httpx.AsyncClient, body: dict[str, Any] | None
) -> None:
    data = await register(api, "nina@example.com")
    response = await api.request("DELETE", "/api/auth/apikey", headers=bearer(data["token"]),
                                 json=body)
    assert_api_error(response, 400)


async def test_revoking_an_unknown_key_is_404(api: httpx.AsyncClient) -> None:
    data = await register(api, "oscar@example.com")
    response = await api.request("DELETE", "/api/auth/apikey", headers=bearer(data["token"]),
                                 json={"api_key": "sk-never-issued"})
    assert_api_error(response, 404)
