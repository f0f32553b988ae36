"""First-start data: the persisted JWT secret and the first admin.

The admin from settings is created once and never overwritten; the JWT secret is
generated on first start when none is configured and kept in the ``settings`` table.
"""

from __future__ import annotations

import secrets

from store.db import Database
from store.users import EmailTaken, create_user, get_user_by_email


async def jwt_secret(db: Database, configured: str) -> str:
    if configured:
        return configured
    await db.execute(
        "INSERT INTO settings (name, value) VALUES ('jwt_secret', $1) ON CONFLICT DO NOTHING",
        secrets.token_urlsafe(48),
    )
    value = await db.fetchval("SELECT value FROM settings WHERE name = 'jwt_secret'")
    assert isinstance(value, str)
    return value


async def ensure_admin(db: Database, email: str, password_hash: str) -> bool:
    """Create the configured admin unless that email exists; True when created."""
    if await get_user_by_email(db, email) is not None:
        return False
    try:
        await create_user(db, email=email, password_hash=password_hash, role="admin")
    except EmailTaken:
        return False
    return True
