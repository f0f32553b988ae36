"""Users: the ``users`` table. Owns account rows and the quota fields the gateway reads.

Password hashing is the caller's business (``workers.passwords``); this module stores the
hash it is given. Imports only ``store.db`` and ``store.ids``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from store.db import Database
from store.errors import UniqueViolation
from store.ids import new_id, new_invite_code


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    password_hash: str
    role: str
    status: str
    plan: str | None
    token_limit: int
    token_used: int
    request_count: int
    expires_at: datetime | None
    rpm: int | None
    balance_fen: int
    rebate_fen: int
    invite_code: str
    invited_by: str | None
    sessions_valid_from: datetime
    created_at: datetime


_COLUMNS = ", ".join(User.__slots__)


def _user(row: Mapping[str, Any] | None) -> User | None:
    return None if row is None else User(**dict(row))


class EmailTaken(Exception):
    """Registration with an email that already has an account."""


async def create_user(
    db: Database,
    *,
    email: str,
    password_hash: str,
    role: str = "user",
    invited_by: str | None = None,
    token_limit: int = 0,
) -> User:
    """Insert a user; ``EmailTaken`` when the (lower-cased) email exists."""
    for _ in range(5):  # retry only the (rare) invite-code collision
        try:
            row = await db.fetchrow(
                f"INSERT INTO users (id, email, password_hash, role, invited_by, token_limit,"
                f" invite_code) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {_COLUMNS}",
                new_id("u"), email.lower(), password_hash, role, invited_by, token_limit,
                new_invite_code(),
            )
        except UniqueViolation as exc:
            if "email" in str(exc.constraint or ""):
                raise EmailTaken(email) from exc
            continue
        user = _user(row)
        assert user is not None
        return user
    raise RuntimeError("could not allocate a unique invite code")


async def get_user(db: Database, user_id: str) -> User | None:
    return _user(await db.fetchrow(f"SELECT {_COLUMNS} FROM users WHERE id = $1", user_id))


async def get_user_by_email(db: Database, email: str) -> User | None:
    return _user(
        await db.fetchrow(f"SELECT {_COLUMNS} FROM users WHERE email = $1", email.lower())
    )


async def get_user_by_invite_code(db: Database, code: str) -> User | None:
    return _user(
        await db.fetchrow(f"SELECT {_COLUMNS} FROM users WHERE invite_code = $1", code.upper())
    )


async def set_password(db: Database, user_id: str, password_hash: str) -> datetime:
    """Store a new hash and end older sessions; returns the new ``sessions_valid_from``."""
    value = await db.fetchval(
        "UPDATE users SET password_hash = $2, sessions_valid_from = now()"
        " WHERE id = $1 RETURNING sessions_valid_from",
        user_id, password_hash,
    )
    assert isinstance(value, datetime)
    return value


async def set_status(db: Database, user_id: str, status: str) -> bool:
    result = await db.execute("UPDATE users SET status = $2 WHERE id = $1", user_id, status)
    return result.endswith(" 1")
