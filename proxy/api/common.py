"""Shared pieces of the /api blueprints: the gateway handle, JSON bodies, the caller.

Errors are ``GatewayError`` s, rendered by the app's one /api handler as
``{"error": {"message", "code"}}`` with the class's status.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

from quart import current_app, request

from proxy.gateway import Gateway
from proxy.sessions import InvalidSession, read_token
from store.users import User, get_user
from workers.errors import AuthenticationFailed, GatewayError, InvalidRequest, PermissionDenied

T = TypeVar("T")


class Unauthorized(AuthenticationFailed):
    code = "unauthorized"


class Forbidden(PermissionDenied):
    code = "forbidden"


def gateway() -> Gateway:
    gw = current_app.extensions["airgate"]
    assert isinstance(gw, Gateway)
    return gw


async def json_body() -> dict[str, Any]:
    try:
        data = await request.get_json(force=True, silent=True)
    except RecursionError:  # deeply nested arrays: `silent` only covers ValueError
        data = None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


def field(body: dict[str, Any], name: str, kind: type[T], *, required: bool = True) -> T | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"'{name}' is required.", param=name)
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"'{name}' must be a {kind.__name__}.", param=name)
    if isinstance(value, str) and not storable(value):
        raise InvalidRequest(f"'{name}' contains characters that are not allowed.", param=name)
    return value


def page_args() -> tuple[int, int]:
    """``page`` (from 1) and ``limit`` (1..500) from the query string."""
    try:
        page = int(request.args.get("page", "1"))
        limit = int(request.args.get("limit", "50"))
    except ValueError:
        raise InvalidRequest("'page' and 'limit' must be integers.") from None
    if page < 1 or not 1 <= limit <= 500:
        raise InvalidRequest("'page' must be >= 1 and 'limit' within 1..500.")
    return page, limit


def storable(value: str) -> bool:
    """Whether Postgres can store ``value`` as text: no NUL, no lone surrogate (which a
    JSON body may carry as an escape). Either would fail in the driver, as a 500."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text(body: dict[str, Any], name: str) -> str:
    value = field(body, name, str)
    assert value is not None
    return value


async def current_user() -> User:
    """The caller of this request, from its JWT; 401 when there is none or it is stale."""
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("A session token is required: 'Authorization: Bearer <jwt>'.")
    gw = gateway()
    try:
        session = read_token(gw.jwt_secret, token.strip())
    except InvalidSession:
        raise Unauthorized("The session token is invalid or expired.") from None
    user = await get_user(gw.db, session.user_id)
    if user is None or session.issued_at < _epoch(user.sessions_valid_from):
        raise Unauthorized("The session has ended; log in again.")
    if user.status != "active":
        raise Forbidden("This account is disabled.")
    return user


async def current_admin() -> User:
    user = await current_user()
    if user.role != "admin":
        raise Forbidden("Administrator access is required.")
    return user


def _epoch(moment: datetime) -> float:
    return moment.timestamp()


def api_error_body(err: GatewayError) -> dict[str, Any]:
    return {"error": {"message": err.message, "code": err.code or err.type}}
