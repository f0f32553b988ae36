"""Prometheus metrics: one registry, owned by the composition root.

Owns every metric airgate exports and their (bounded) label sets. No module-level
registry: ``Metrics()`` builds a fresh ``CollectorRegistry`` each time, so tests and
several gateways in one process do not collide. Imports nothing from the gateway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

# A snapshot callback: rows of (label values, value) for one gauge family.
Rows = Callable[[], Iterable[tuple[Sequence[str], float]]]


class SnapshotGauges(Collector):
    """Gauges read at scrape time from callbacks (state that lives in actors and pools)."""

    def __init__(self) -> None:
        self._families: list[tuple[str, str, list[str], Rows]] = []

    def add(self, name: str, documentation: str, labels: list[str], rows: Rows) -> None:
        self._families.append((name, documentation, labels, rows))

    def collect(self) -> Iterable[Metric]:
        for name, documentation, labels, rows in self._families:
            family = GaugeMetricFamily(name, documentation, labels=labels)
            for values, value in rows():
                family.add_metric(list(values), value)
            yield family

    def describe(self) -> Iterable[Metric]:
        return []

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


class Metrics:
    """Every metric, with labels drawn from bounded sets only (never a user or key name)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._by_model: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._by_route: dict[str, tuple[Any, Any, Any, Any]] = {}
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.snapshots = SnapshotGauges()
        r.register(self.snapshots)
        self.requests = Counter(
            "airgate_requests", "Requests served", ["route", "model", "status_class"],
            registry=r,
        )
        self.latency = Histogram(
            "airgate_request_duration_seconds", "End-to-end latency", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "airgate_time_to_first_token_seconds", "Time to first streamed byte", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.upstream_time = Histogram(
            "airgate_upstream_duration_seconds", "Time spent waiting on the upstream",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.overhead = Histogram(
            "airgate_gateway_overhead_seconds",
            "End-to-end latency minus upstream time: what the gateway adds", ["route"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 1.0), registry=r,
        )
        self.tokens = Counter(
            "airgate_tokens", "Tokens billed", ["model", "kind"], registry=r,
        )
        self.cost = Counter(
            "airgate_cost_micro_cny", "Cost billed, micro-CNY", ["model"], registry=r,
        )
        self.active_streams = Gauge(
            "airgate_active_streams", "Streams open to clients", registry=r,
        )
        self.shed = Counter(
            "airgate_shed_requests", "Requests refused for lack of capacity", ["reason"],
            registry=r,
        )
        self.upstream_failures = Counter(
            "airgate_upstream_failures", "Upstream failures by class", ["failure_class"],
            registry=r,
        )
        self.batch_pending = Gauge(
            "airgate_usage_pending_records", "Usage records waiting to be flushed", registry=r,
        )
        self.batch_flush = Histogram(
            "airgate_usage_flush_seconds", "Usage flush duration",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_failures = Counter(
            "airgate_usage_flush_failures", "Usage flushes that failed and will be retried",
            registry=r,
        )
        self.batch_rejected = Counter(
            "airgate_usage_records_rejected",
            "Usage records the database refused (logged in full for reconciliation)",
            registry=r,
        )
        self.batch_written = Counter(
            "airgate_usage_records_written", "Usage records written to Postgres", registry=r,
        )

    def by_model(self, model: str) -> tuple[Any, Any, Any, Any]:
        """(prompt, cached, completion tokens, cost) children for ``model``, cached: the
        label lookup is a lock and a dict per call, and this runs once per request."""
        found = self._by_model.get(model)
        if found is None:
            tokens = self.tokens
            found = self._by_model[model] = (
                tokens.labels(model, "prompt"), tokens.labels(model, "cached"),
                tokens.labels(model, "completion"), self.cost.labels(model),
            )
        return found

    def by_route(self, route: str) -> tuple[Any, Any, Any, Any]:
        """(latency, ttft, upstream time, overhead) children for ``route``, cached."""
        found = self._by_route.get(route)
        if found is None:
            found = self._by_route[route] = (
                self.latency.labels(route), self.ttft.labels(route),
                self.upstream_time.labels(route), self.overhead.labels(route),
            )
        return found

    def render(self) -> bytes:
        """The registry in Prometheus text exposition format."""
        return generate_latest(self.registry)
