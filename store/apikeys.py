"""API keys: the ``api_keys`` table. Keys are stored as a SHA-256 hash plus a short hint.

A 32-byte random ``sk-`` key has enough entropy that a fast hash is the right tool (a slow
KDF would put seconds of CPU on the request path for no gain). Imports ``store.db``.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from store.db import Database
from store.ids import new_id


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_hint(key: str) -> str:
    return f"{key[:7]}...{key[-4:]}"


def new_secret() -> str:
    return "sk-" + secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class ApiKeyOwner:
    api_key_id: str
    user_id: str


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    id: str
    name: str
    hint: str
    created_at: datetime
    last_used_at: datetime | None


async def create_api_key(db: Database, user_id: str, name: str = "") -> tuple[str, str]:
    """Create a key for ``user_id``; returns ``(api_key_id, full_secret)``."""
    secret = new_secret()
    key_id = new_id("ak")
    await db.execute(
        "INSERT INTO api_keys (id, user_id, key_hash, key_hint, name) VALUES ($1,$2,$3,$4,$5)",
        key_id, user_id, hash_key(secret), key_hint(secret), name,
    )
    return key_id, secret


async def find_api_key(db: Database, key_hash: bytes) -> ApiKeyOwner | None:
    """The live (not revoked) key with this hash."""
    row = await db.fetchrow(
        "SELECT id, user_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", key_hash
    )
    return None if row is None else ApiKeyOwner(row["id"], row["user_id"])


async def revoke_api_key(db: Database, user_id: str, key_hash: bytes) -> bool:
    """Revoke one of ``user_id`` 's keys; False when it has no such live key."""
    result = await db.execute(
        "UPDATE api_keys SET revoked_at = now()"
        " WHERE key_hash = $1 AND user_id = $2 AND revoked_at IS NULL",
        key_hash, user_id,
    )
    return result.endswith(" 1")


async def list_api_keys(db: Database, user_id: str) -> list[ApiKeyInfo]:
    rows = await db.fetch(
        "SELECT id, name, key_hint, created_at, last_used_at FROM api_keys"
        " WHERE user_id = $1 AND revoked_at IS NULL ORDER BY created_at",
        user_id,
    )
    return [
        ApiKeyInfo(r["id"], r["name"], r["key_hint"], r["created_at"], r["last_used_at"])
        for r in rows
    ]
