"""The overload benchmark's verdict: the p99 ratio, and what makes a run not count."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.bench.overload import settle_capacity, verdict


def _run(*, p99: float, scheduled: int = 1000, accepted: int = 1000, shed: int = 0,
         errors: int = 0, retry_after_share: float | None = None) -> dict[str, Any]:
    return {
        "accepted_p99_ms": p99, "scheduled": scheduled, "sent": scheduled,
        "accepted": accepted, "shed": shed, "errors": errors, "timeouts": 0,
        "gen_limited": 0, "gen_cpu_share": 0.2, "retry_after_share": retry_after_share,
        "refusal_kinds": {"429 gateway_overloaded": shed} if shed else {},
        "outside_window_timeouts": 0, "error_samples": [], "peak_open_connections": 100,
        "accepted_rps": accepted / 8, "offered_rps": scheduled / 8, "drain_s": 0.0,
    }


def test_a_p99_within_twice_the_baseline_passes() -> None:
    lines = verdict(_run(p99=10.0), _run(p99=19.0, scheduled=2000, shed=1000,
                                         retry_after_share=1.0), 2.0)
    assert lines[0].startswith("p99 accepted at 2x / p99 at 1x = 1.90")
    assert lines[-1].startswith("PASS")


def test_a_p99_over_twice_the_baseline_fails() -> None:
    lines = verdict(_run(p99=10.0), _run(p99=21.0, scheduled=2000, shed=1000,
                                         retry_after_share=1.0), 2.0)
    assert lines[-1].startswith("FAIL")


def test_a_refusal_without_retry_after_fails() -> None:
    lines = verdict(_run(p99=10.0), _run(p99=12.0, scheduled=2000, shed=1000,
                                         retry_after_share=0.9), 2.0)
    assert lines[-1].startswith("FAIL")


@pytest.mark.parametrize("shed", [15, 100])
def test_a_baseline_that_did_not_keep_up_cannot_pass(shed: int) -> None:
    # At 1x the gateway already refused more than a ladder rung may (1 %): its p99 is no
    # "at capacity" figure, and a small ratio against it says nothing.
    base = _run(p99=1800.0, accepted=1000 - shed, shed=shed, retry_after_share=1.0)
    lines = verdict(base, _run(p99=90.0, scheduled=2000, shed=1200, retry_after_share=1.0),
                    2.0)
    assert any("did not keep up as a ladder rung must" in line for line in lines)
    assert lines[-1].startswith("FAIL")
    assert lines[-1].endswith("(False)")


def test_when_the_1x_run_does_not_keep_up_the_next_lower_step_is_r() -> None:
    tried: list[float] = []

    def run_1x(rate: float) -> dict[str, Any]:
        tried.append(rate)
        return _run(p99=20.0, shed=50) if rate > 1500 else _run(p99=20.0)

    capacity, base = settle_capacity([1650.0, 1480.0, 1200.0], run_1x)
    assert (capacity, tried) == (1480.0, [1650.0, 1480.0])
    assert base["shed"] == 0


def test_the_lowest_step_is_kept_even_when_it_does_not_keep_up() -> None:
    capacity, base = settle_capacity([900.0, 700.0], lambda rate: _run(p99=5.0, shed=80))
    assert capacity == 700.0
    assert base["shed"] == 80  # and the verdict then fails on it
    assert verdict(base, _run(p99=6.0, scheduled=2000, shed=1000, retry_after_share=1.0),
                   2.0)[-1].startswith("FAIL")
