"""Password hashing with scrypt (a slow, memory-hard KDF), run off the event loop.

Owns the hash format ``scrypt$n$r$p$salt$hash`` (base64). Verification is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import trio

_N, _R, _P = 2**14, 8, 1
_DKLEN = 32


def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, dklen=_DKLEN, maxmem=64 * 1024 * 1024
    )


def hash_password_sync(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _derive(password, salt, _N, _R, _P)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password_sync(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = _derive(password, base64.b64decode(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


async def hash_password(password: str) -> str:
    return await trio.to_thread.run_sync(hash_password_sync, password)


async def verify_password(password: str, stored: str) -> bool:
    return await trio.to_thread.run_sync(verify_password_sync, password, stored)
