"""Scrape-time gauges: the key pool's per-key state, the database pool, overload.

Labels are bounded: upstream key ids (a handful, created by admins) and health states;
never a user, an email or a key's display name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from observability.metrics import Metrics
from store.db import Database
from workers.health import HealthState
from workers.overload import Admission
from workers.pool import KeyPool

Rows = Iterable[tuple[Sequence[str], float]]


def register_snapshots(
    metrics: Metrics, pool: KeyPool, db: Database, admission: Admission
) -> None:
    add = metrics.snapshots.add

    def states() -> Rows:
        return [((state,), count) for state, count in pool.health_counts().items()]

    def key_health() -> Rows:
        return [((k.key_id, state.value), 1.0 if k.state == state.value else 0.0)
                for k in pool.snapshot() for state in HealthState]

    def inflight() -> Rows:
        return [((k.key_id,), k.inflight) for k in pool.snapshot()]

    def inbox() -> Rows:
        return [((k.key_id,), k.queued) for k in pool.snapshot()]

    def rpm() -> Rows:
        return [((k.key_id,), k.rpm_headroom) for k in pool.snapshot()
                if k.rpm_headroom is not None]

    def tpm() -> Rows:
        return [((k.key_id,), k.tpm_headroom) for k in pool.snapshot()
                if k.tpm_headroom is not None]

    def db_pool() -> Rows:
        size, idle, maximum = db.pool_stats()
        return [(("open",), size), (("idle",), idle), (("max",), maximum)]

    add("airgate_upstream_keys", "Upstream keys per health state", ["state"], states)
    add("airgate_upstream_key_health", "1 for the key's current health state",
        ["key_id", "state"], key_health)
    add("airgate_upstream_key_inflight", "Requests in flight on the key", ["key_id"],
        inflight)
    add("airgate_upstream_key_inbox", "Requests queued for the key", ["key_id"], inbox)
    add("airgate_upstream_key_rpm_headroom", "Requests the key may start now", ["key_id"],
        rpm)
    add("airgate_upstream_key_tpm_headroom", "Tokens the key may use now", ["key_id"], tpm)
    add("airgate_db_pool_connections", "Database pool connections", ["state"], db_pool)
    add("airgate_scheduler_lag_seconds",
        "How late the event loop runs work (smoothed); above the overload threshold the "
        "admission limit shrinks", [], lambda: [((), admission.lag_s)])
    add("airgate_event_loop_busy_ratio",
        "Share of the last 100 ms the event loop's thread was running or waiting for a "
        "core; the admission limit shrinks only when this is 0.9 or more", [],
        lambda: [((), admission.busy)])
    add("airgate_admission_limit", "Completions let in at once (+Inf: no limit)", [],
        lambda: [((), admission.limit)])
    add("airgate_admitted_requests", "Completions in flight (counted at the door)", [],
        lambda: [((), float(admission.inflight))])
    add("airgate_overload_shedding", "1 while new completions are refused as overloaded",
        [], lambda: [((), 1.0 if admission.shedding else 0.0)])
    add("airgate_overload_refusals_held",
        "Refusals held because their connection came back before the wait it was told "
        "(AIRGATE_REFUSAL_HOLD_MS)",
        [], lambda: [((), float(admission.held))])
    add("airgate_overload_retry_after_seconds",
        "Wait told to a completion refused now (before jitter): those ahead of it over "
        "the completion rate", [], lambda: [((), admission.wait_s)])
