"""One database read for many concurrent callers asking the same question.

A cold cache meets a burst (a restart under load, a thousand clients sharing one key):
every request misses at once. Without coalescing each one reads the database, the pool
queues them, and the burst waits seconds for a thousand identical answers. With
``SingleFlight`` the first caller for a key runs the read; the others wait for its result.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

import trio

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(eq=False)
class _Call(Generic[V]):
    done: trio.Event = field(default_factory=trio.Event)
    value: V | None = None
    error: Exception | None = None
    ok: bool = False


class SingleFlight(Generic[K, V]):
    """Concurrent ``run(key, read)`` calls share the first caller's ``read()``."""

    def __init__(self) -> None:
        self._calls: dict[K, _Call[V]] = {}

    def in_flight(self) -> int:
        return len(self._calls)

    async def run(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        """The leader's result, or its exception raised again here. A leader that was
        cancelled (its client left) answers nobody: a waiter then reads for itself."""
        while True:
            call = self._calls.get(key)
            if call is None:
                return await self._lead(key, read)
            await call.done.wait()
            if call.ok:
                return cast(V, call.value)
            if call.error is not None:
                raise call.error

    async def _lead(self, key: K, read: Callable[[], Awaitable[V]]) -> V:
        call: _Call[V] = _Call()
        self._calls[key] = call
        try:
            value = await read()
            call.value, call.ok = value, True
            return value
        except Exception as exc:
            call.error = exc
            raise
        finally:
            del self._calls[key]
            call.done.set()
