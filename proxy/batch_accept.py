"""Accepting queued connections in batches instead of one per pass of the scheduler.

trio's accept loop takes one connection, starts its handler, and accepts again after a
checkpoint: one connection per pass of the scheduler. On a busy gateway a pass is
milliseconds, so a burst of a thousand connects (clients opening connections faster
than answers come back, at the onset of an overload) waits seconds in the listen
backlog, and every new connection behind it, a `/metrics` scrape included, with them.

:class:`BatchListener` takes, after each accept that had to wait, whatever else the
kernel has queued (up to ``BATCH``) without waiting, and hands those out on the next
calls without a checkpoint: the loop starts their handlers in the same pass.
:func:`install` makes hypercorn's trio worker build its listeners from it (it looks up
``trio.SocketListener`` in its own module each time it starts serving).
"""

from __future__ import annotations

import collections
import socket
import types
from typing import Any

import trio
from hypercorn.trio import run as hypercorn_run

from proxy.module_view import install_view

BATCH = 64  # connections taken in one pass at most


class BatchListener(trio.abc.Listener[trio.SocketStream]):
    """A :class:`trio.SocketListener` that takes the queued connections together."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._listener = trio.SocketListener(sock)
        self._ready: collections.deque[trio.SocketStream] = collections.deque()
        # trio keeps the standard socket private; without it this is a plain listener.
        raw = getattr(sock, "_sock", None)
        self._raw = raw if isinstance(raw, socket.socket) else None

    async def accept(self) -> trio.SocketStream:
        if self._ready:
            return self._ready.popleft()
        stream = await self._listener.accept()
        self._take_queued()
        return stream

    def _take_queued(self) -> None:
        raw = self._raw
        if raw is None:
            return
        while len(self._ready) < BATCH:
            try:
                conn, _ = raw.accept()
            except OSError:
                # Nothing queued (BlockingIOError), or an error (EMFILE, an aborted
                # connect) that the next plain accept meets and handles as trio does.
                return
            self._ready.append(trio.SocketStream(trio.socket.from_stdlib_socket(conn)))

    async def aclose(self) -> None:
        ready, self._ready = self._ready, collections.deque()
        for stream in ready:  # accepted, never handed out
            stream.socket.close()
        await self._listener.aclose()


class _TrioForHypercorn(types.ModuleType):
    """trio as ``hypercorn.trio.run`` sees it: the same, with :class:`BatchListener`."""

    SocketListener = BatchListener

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install() -> bool:
    """Make hypercorn's trio worker accept in batches; False (nothing changed) when the
    installed hypercorn is not laid out as expected."""
    return install_view(hypercorn_run, "trio", trio, _TrioForHypercorn)
