"""The key pool: supervisor of the key actors, and the router that picks one per attempt.

Owns the set of running ``KeyActor`` s. Admin changes call ``apply`` with the new key
rows; actors are started, replaced or stopped without a restart, each in its own cancel
scope under the pool's nursery. ``pick`` chooses the highest priority tier that has a
key able to take the job now, then draws among that tier's keys by weight.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from observability.metrics import Metrics
from store.upstream_keys import UpstreamKey
from workers.health import HealthState
from workers.keyactor import KeyActor, OnDisable
from workers.pump import ReadPump
from workers.upstream import UpstreamClient

log = logging.getLogger("airgate.pool")


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    key_id: str
    state: str
    inflight: int
    queued: int
    rpm_headroom: float | None
    tpm_headroom: float | None


class KeyPool:
    """Starts, replaces and stops key actors; routes jobs among them."""

    def __init__(
        self,
        client: UpstreamClient,
        metrics: Metrics,
        *,
        inbox_size: int,
        first_byte_timeout_s: float,
        idle_timeout_s: float,
        on_disable: OnDisable,
        rng: random.Random | None = None,
        share: tuple[int, int] = (0, 1),
        pump: bool = True,
    ) -> None:
        self._client = client
        self._metrics = metrics
        self._inbox_size = inbox_size
        self._first_byte_timeout_s = first_byte_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._on_disable = on_disable
        self._share = share
        self._rng = rng or random.Random()
        self.actors: dict[str, KeyActor] = {}
        self._nursery: trio.Nursery | None = None
        # Reads the upstream sockets of the actors' streams (see workers.pump).
        self._pump = ReadPump() if pump else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._pump is not None:
                await nursery.start(self._pump.run)
            task_status.started()
            await trio.sleep_forever()

    async def apply(self, keys: Iterable[UpstreamKey]) -> None:
        """Make the running actors match ``keys`` (the full set)."""
        wanted = {k.id: k for k in keys}
        for key_id in list(self.actors):
            if key_id not in wanted:
                self._stop(key_id)
        for key in wanted.values():
            await self.put_if_changed(key)

    async def put_if_changed(self, key: UpstreamKey) -> None:
        """Like ``put``, but keep the running actor (and its health) when nothing changed."""
        current = self.actors.get(key.id)
        if current is None or current.key != key:
            await self.put(key)

    async def put(self, key: UpstreamKey) -> None:
        """Start an actor for ``key``, replacing (and draining) any older one."""
        assert self._nursery is not None, "KeyPool.run must be started first"
        if key.id in self.actors:
            self._stop(key.id)
        actor = self._make_actor(key)
        await self._nursery.start(actor.run)
        self.actors[key.id] = actor

    def remove(self, key_id: str) -> None:
        if key_id in self.actors:
            self._stop(key_id)

    def _stop(self, key_id: str) -> None:
        actor = self.actors.pop(key_id)
        actor.close()  # queued jobs are still answered; in-flight streams finish

    def _make_actor(self, key: UpstreamKey) -> KeyActor:
        return KeyActor(
            key, self._client, self._metrics,
            inbox_size=self._inbox_size,
            first_byte_timeout_s=self._first_byte_timeout_s,
            idle_timeout_s=self._idle_timeout_s,
            on_disable=self._on_disable, share=self._share, pump=self._pump,
        )

    # -- routing ------------------------------------------------------------------------

    def serving(self, model: str) -> list[KeyActor]:
        return [a for a in self.actors.values() if a.serves(model)]

    def pick(self, model: str, tokens: int, exclude: set[str]) -> KeyActor | None:
        """The actor for the next attempt, or None when no key can take it now."""
        tiers: dict[int, list[KeyActor]] = {}
        for actor in self.actors.values():
            if actor.key.id not in exclude and actor.serves(model):
                tiers.setdefault(actor.key.priority, []).append(actor)
        now = trio.current_time()
        for priority in sorted(tiers, reverse=True):
            ready = [a for a in tiers[priority] if a.can_take(now, tokens)]
            if ready:
                if len(ready) == 1:
                    return ready[0]
                return self._rng.choices(ready, weights=[a.key.weight for a in ready])[0]
        return None

    def fallback(self, model: str, exclude: set[str]) -> KeyActor | None:
        """A healthy key whose inbox has room, to queue on when none can take work now."""
        now = trio.current_time()
        candidates = [
            a for a in self.serving(model)
            if a.key.id not in exclude and a.has_room() and a.health.available(now)
        ]
        if not candidates:
            return None
        return min(candidates, key=lambda a: (-a.key.priority, a.queued + a.inflight))

    def retry_after(self, model: str, now: float) -> float | None:
        waits = [w for a in self.serving(model) if (w := a.retry_after(now)) is not None]
        return min(waits) if waits else None

    def snapshot(self) -> list[KeySnapshot]:
        """Each key's state now, for metrics (read at scrape time)."""
        now = trio.current_time()
        rows = []
        for actor in self.actors.values():
            rows.append(KeySnapshot(
                key_id=actor.key.id, state=actor.health.state(now).value,
                inflight=actor.inflight, queued=actor.queued,
                rpm_headroom=actor.rpm.level(now) if actor.rpm is not None else None,
                tpm_headroom=actor.tpm.level(now) if actor.tpm is not None else None,
            ))
        return rows

    def health_counts(self) -> dict[str, int]:
        now = trio.current_time()
        counts = {state.value: 0 for state in HealthState}
        for actor in self.actors.values():
            counts[actor.health.state(now).value] += 1
        return counts
