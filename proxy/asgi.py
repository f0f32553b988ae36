"""Small raw-ASGI helpers for the hot path (the /v1 routes and /metrics).

Owns reading a bounded request body and sending whole responses. Quart is not used on
the hot path: it costs ~0.1 ms a request that a relay does not need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import trio

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Headers = list[tuple[bytes, bytes]]

# Oversized bodies up to this size are drained so the client can read our 413.
DISCARD_CAP = 64 * 1024 * 1024


class BodyTooLargeError(Exception):
    """The request body is over the configured limit."""


class ClientGone(Exception):
    """The client disconnected before its body was read."""


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _queued(receive: Receive) -> Callable[[], Message] | None:
    """A way to take a message that is already queued without a pass through the trio
    scheduler, when ``receive`` allows one. hypercorn's trio worker hands the app a
    memory channel's ``receive``, which always yields to the scheduler first, even with
    the message waiting; its ``receive_nowait`` does not. (Other servers: None.)"""
    channel = getattr(receive, "__self__", None)
    if isinstance(channel, trio.MemoryReceiveChannel):
        nowait: Callable[[], Message] = channel.receive_nowait
        return nowait
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes.

    An oversized body is read and discarded (up to ``DISCARD_CAP``) before refusing, so
    that clients which finish writing before they read (most do) see the 413. A body
    that came with its head (most do) is taken without waiting for the scheduler: on a
    busy gateway one pass is milliseconds of every request's latency.
    """
    length = header(scope, b"content-length")
    declared = int(length) if length is not None and length.isdigit() else None
    if declared is not None and declared > DISCARD_CAP:
        raise BodyTooLargeError
    parts: list[bytes] = []
    size = 0
    queued = _queued(receive)
    while True:
        if queued is None:
            message = await receive()
        else:
            try:
                message = queued()
            except trio.WouldBlock:
                message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > DISCARD_CAP:
            raise BodyTooLargeError
        if chunk and size <= limit:
            parts.append(chunk)
        if not message.get("more_body", False):
            if size > limit:
                raise BodyTooLargeError
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def send_response(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]]
) -> None:
    all_headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def drain_body(scope: Scope, receive: Receive, limit: int, timeout_s: float = 1.0) -> None:
    """Read and drop a request body nobody needs, if it is at most ``limit`` bytes and
    comes within ``timeout_s``; a client that leaves meanwhile is no error."""
    with trio.move_on_after(timeout_s), contextlib.suppress(BodyTooLargeError, ClientGone):
        await read_body(scope, receive, limit)
