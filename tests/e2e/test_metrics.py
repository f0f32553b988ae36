"""/metrics: the families ops teams rely on, bounded labels, and the ops artefacts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Harness, in_thread
from workers.overload import WAIT_S

OPS = Path(__file__).resolve().parents[2] / "observability" / "ops"
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
             "gauge": ("",), "summary": ("", "_sum", "_count"), "info": ("_info",)}


def exported_names(text: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


async def scrape(h: Harness) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.get(h.base_url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_requests_show_up_with_bounded_labels(harness: Harness) -> None:
    key_row = await harness.add_key(rpm=100, tpm=100_000)
    user_id, key = await harness.add_user()
    client = harness.client(key)
    await in_thread(client.chat.completions.create, model="deepseek-v4-flash",
                    messages=[{"role": "user", "content": "hi"}])
    await harness.wait_for_usage(user_id, 1)
    text = await scrape(harness)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["airgate_requests"].samples
                if s.name == "airgate_requests_total"]
    assert any(s.labels == {"route": "/v1/chat/completions", "model": "deepseek-v4-flash",
                            "status_class": "2xx"} and s.value == 1 for s in requests)
    tokens = {(s.labels["kind"], s.value) for s in families["airgate_tokens"].samples
              if s.name == "airgate_tokens_total"}
    assert ("prompt", 1.0) in tokens  # the mock counts one word
    assert ("completion", 20.0) in tokens
    assert any(s.labels == {"key_id": key_row.id, "state": "healthy"} and s.value == 1
               for s in families["airgate_upstream_key_health"].samples)
    for name in ("airgate_gateway_overhead_seconds", "airgate_upstream_duration_seconds",
                 "airgate_request_duration_seconds", "airgate_db_pool_connections",
                 "process_resident_memory_bytes", "airgate_usage_records_written",
                 "airgate_scheduler_lag_seconds", "airgate_overload_shedding"):
        assert name in families, name
    assert families["airgate_overload_shedding"].samples[0].value == 0
    # nothing measured yet (the monitor is off in e2e): the shortest wait
    assert families["airgate_overload_retry_after_seconds"].samples[0].value == WAIT_S[0]
    # No label carries a user id, an email or an API key.
    for family in families.values():
        for sample in family.samples:
            for value in sample.labels.values():
                assert user_id not in value
                assert "@" not in value
                assert not value.startswith("sk-")


async def test_every_metric_in_the_dashboard_and_alerts_exists(harness: Harness) -> None:
    names = exported_names(await scrape(harness))
    dashboard = json.loads((OPS / "grafana-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    expressions.append((OPS / "alerts.yml").read_text())
    referenced = {m for e in expressions
                  for m in re.findall(r"\b((?:airgate|process)_[a-z_]+)\b", e)}
    assert len(referenced) > 15
    missing = sorted(referenced - names)
    assert missing == []
