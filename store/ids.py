"""Identifier and secret generation for rows the store creates. Pure; no I/O."""

from __future__ import annotations

import secrets


def new_id(prefix: str) -> str:
    """A random, URL-safe id such as ``u_3f9c1a2b7d4e5f60``."""
    return f"{prefix}_{secrets.token_hex(8)}"


def new_invite_code() -> str:
    """An invite code in the seed's ``AIR-XXXX`` style (8 characters for headroom)."""
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return "AIR-" + "".join(secrets.choice(alphabet) for _ in range(8))
