"""Session tokens (JWT, HS256) for the /api routes.

Owns issuing and verifying tokens. A token carries the user id and its issue time; a
token issued before the user's ``sessions_valid_from`` (a password change) is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

_ALGORITHM = "HS256"


class InvalidSession(Exception):
    """The token is missing, malformed, expired or badly signed."""


@dataclass(frozen=True, slots=True)
class Session:
    user_id: str
    issued_at: float


def issue_token(secret: str, user_id: str, role: str, ttl_s: int) -> str:
    now = time.time()
    claims = {"sub": user_id, "role": role, "iat": now, "exp": int(now + ttl_s)}
    return jwt.encode(claims, secret, algorithm=_ALGORITHM)


def read_token(secret: str, token: str) -> Session:
    try:
        claims = jwt.decode(
            token, secret, algorithms=[_ALGORITHM], options={"require": ["sub", "iat", "exp"]}
        )
    except jwt.PyJWTError as exc:
        raise InvalidSession(str(exc)) from exc
    return Session(user_id=str(claims["sub"]), issued_at=float(claims["iat"]))
