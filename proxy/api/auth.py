"""The /api/auth blueprint: register, login, API keys."""

from __future__ import annotations

import re
from typing import Any

import trio
from quart import Blueprint, request

from proxy.api.common import Forbidden, Unauthorized, current_user, field, gateway, json_body, text
from proxy.sessions import issue_token
from store.apikeys import create_api_key, hash_key, list_api_keys, revoke_api_key
from store.users import EmailTaken, User, create_user, get_user_by_email, get_user_by_invite_code
from workers.errors import Conflict, InvalidRequest, NotFound, RateLimited
from workers.passwords import hash_password, verify_password

bp = Blueprint("auth", __name__, url_prefix="/api/auth")

_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}$")
MIN_PASSWORD = 8
MAX_PASSWORD = 256


def user_brief(user: User) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "role": user.role}


def session_reply(user: User) -> dict[str, Any]:
    gw = gateway()
    token = issue_token(gw.jwt_secret, user.id, user.role, gw.settings.jwt_ttl_s)
    return {"token": token, "user": user_brief(user)}


def check_password_shape(password: str, name: str = "password") -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidRequest(
            f"'{name}' must be {MIN_PASSWORD} to {MAX_PASSWORD} characters.", param=name
        )


@bp.post("/register")
async def register() -> dict[str, Any]:
    body = await json_body()
    email = text(body, "email").strip()
    password = text(body, "password")
    invite = field(body, "invite_code", str, required=False)
    if not _EMAIL.match(email):
        raise InvalidRequest("'email' is not a valid email address.", param="email")
    check_password_shape(password)
    gw = gateway()
    inviter = None
    if invite:
        inviter = await get_user_by_invite_code(gw.db, invite.strip())
        if inviter is None:
            raise InvalidRequest("'invite_code' is not a valid invite code.", param="invite_code")
    try:
        user = await create_user(
            gw.db, email=email, password_hash=await hash_password(password),
            invited_by=inviter.id if inviter else None,
        )
    except EmailTaken:
        raise Conflict("An account with this email already exists.") from None
    return session_reply(user)


async def login_user(body: dict[str, Any]) -> User:
    email = text(body, "email").strip()
    password = text(body, "password")
    gw = gateway()
    # Only failures are counted: per account (guessing one password) and per client
    # address (trying many accounts). Successful logins are never slowed down.
    keys = ((gw.login_by_account, email.lower()), (gw.login_by_ip, request.remote_addr or "-"))
    now = trio.current_time()
    for throttle, key in keys:
        wait = throttle.retry_after(key, now)
        if wait is not None:
            raise RateLimited("Too many failed logins; retry later.", retry_after_s=wait,
                              code="too_many_failed_logins")
    user = await get_user_by_email(gw.db, email)
    # Verify against a real hash even for unknown emails, so timing tells nothing.
    stored = user.password_hash if user is not None else _DUMMY_HASH
    if not await verify_password(password, stored) or user is None:
        for throttle, key in keys:
            throttle.failed(key, trio.current_time())
        raise Unauthorized("Incorrect email or password.")
    gw.login_by_account.succeeded(email.lower())
    if user.status != "active":
        raise Forbidden("This account is disabled.")
    return user


_DUMMY_HASH = (
    "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)


@bp.post("/login")
async def login() -> dict[str, Any]:
    return session_reply(await login_user(await json_body()))


@bp.post("/apikey")
async def new_api_key() -> dict[str, Any]:
    user = await current_user()
    body: dict[str, Any] = {}
    try:
        body = await json_body()
    except InvalidRequest:
        body = {}  # the seed's call has no body; a name is optional
    name = field(body, "name", str, required=False) or ""
    gw = gateway()
    _, secret = await create_api_key(gw.db, user.id, name[:100])
    await gw.events.key_revoked(hash_key(secret))  # a cached "no such key" must go
    return {"api_key": secret}


@bp.delete("/apikey")
async def delete_api_key() -> dict[str, Any]:
    user = await current_user()
    secret = text(await json_body(), "api_key")
    gw = gateway()
    digest = hash_key(secret)
    if not await revoke_api_key(gw.db, user.id, digest):
        raise NotFound("No such API key.")
    await gw.events.key_revoked(digest)
    return {"revoked": True}


@bp.get("/apikeys")
async def api_keys() -> dict[str, Any]:
    user = await current_user()
    keys = await list_api_keys(gateway().db, user.id)
    return {"api_keys": [
        {"id": k.id, "name": k.name, "key": k.hint,
         "created_at": int(k.created_at.timestamp()),
         "last_used_at": int(k.last_used_at.timestamp()) if k.last_used_at else None}
        for k in keys
    ]}
