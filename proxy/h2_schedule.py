"""Which HTTP/2 stream hypercorn sends next: in turn, instead of by RFC 7540 priority.

hypercorn's HTTP/2 connection asks a ``priority.PriorityTree`` for the next stream with
data to send, once per frame. The tree keeps every stream of the connection in a heap
and pops the blocked ones (those with nothing to send: most streams of a gateway wait
on their upstream) until it finds one that is not, then pushes them all back. With 100
streams on a connection, at 10,000 streams that was 36 % of the gateway's CPU in a
py-spy profile, and its saturation made the overload control refuse 212 of them.

:class:`RoundRobin` answers the same calls from a queue of the streams that may send:
``next`` is O(1) (a stream blocked while queued is skipped once, when it comes up),
and streams take turns, one frame each. Client priorities are not followed: RFC 9113
deprecated that scheme, and a gateway's streams are alike. :func:`install` gives
hypercorn's h2 module a view of the ``priority`` package with :class:`RoundRobin` as its
tree, the same kind of seam as ``proxy.batch_accept``.
"""

from __future__ import annotations

import collections
import types
from typing import Any

import priority
from hypercorn.protocol import h2 as hypercorn_h2
from priority.priority import DeadlockError, DuplicateStreamError, MissingStreamError

from proxy.module_view import install_view


class RoundRobin:
    """The part of ``priority.PriorityTree`` hypercorn uses, scheduling in turn."""

    __slots__ = ("_active", "_queue", "_queued")

    def __init__(self) -> None:
        self._active: dict[int, bool] = {}  # every stream: may it send?
        self._queue: collections.deque[int] = collections.deque()
        self._queued: set[int] = set()  # in the queue (at most once each)

    def insert_stream(self, stream_id: int, depends_on: int | None = None,
                      weight: int = 16, exclusive: bool = False) -> None:
        """Add a stream, able to send (as the tree does)."""
        if stream_id in self._active:
            raise DuplicateStreamError(f"stream {stream_id} already in the tree")
        self._active[stream_id] = True
        self._enqueue(stream_id)

    def reprioritize(self, stream_id: int, depends_on: int | None = None,
                     weight: int = 16, exclusive: bool = False) -> None:
        """Priorities are not followed. A PRIORITY frame may name any stream id, opened or
        not: hypercorn inserts an unknown one when this raises, and the tree never forgets
        it, so unknown ids are ignored instead (a stream is inserted when its HEADERS
        come). The tree capped such entries at 1,000; ignored, there are none."""

    def remove_stream(self, stream_id: int) -> None:
        self._known(stream_id)
        del self._active[stream_id]  # its queue entry, if any, is dropped when it comes up

    def block(self, stream_id: int) -> None:
        """The stream has nothing to send (or no window) for now."""
        self._known(stream_id)
        self._active[stream_id] = False

    def unblock(self, stream_id: int) -> None:
        self._known(stream_id)
        self._active[stream_id] = True
        self._enqueue(stream_id)

    def __iter__(self) -> RoundRobin:
        return self

    def __next__(self) -> int:
        """The next stream that may send; it goes to the back of the queue."""
        queue, queued, active = self._queue, self._queued, self._active
        while queue:
            stream_id = queue.popleft()
            if active.get(stream_id):
                queue.append(stream_id)
                return stream_id
            queued.discard(stream_id)
        raise DeadlockError("no stream can send")

    def _enqueue(self, stream_id: int) -> None:
        if stream_id not in self._queued:
            self._queued.add(stream_id)
            self._queue.append(stream_id)

    def _known(self, stream_id: int) -> None:
        if stream_id not in self._active:
            raise MissingStreamError(f"stream {stream_id} is not in the tree")


class _PriorityForHypercorn(types.ModuleType):
    """``priority`` as hypercorn's h2 module sees it: the same, with :class:`RoundRobin`."""

    PriorityTree = RoundRobin

    def __getattr__(self, name: str) -> Any:
        return getattr(priority, name)


def install() -> bool:
    """Make hypercorn's HTTP/2 connections schedule streams in turn; False (nothing
    changed) when the installed hypercorn is not laid out as expected."""
    return install_view(hypercorn_h2, "priority", priority, _PriorityForHypercorn)
