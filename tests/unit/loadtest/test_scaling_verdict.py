"""``loadtest.bench.scaling``: pooling turns, the ratios and the verdict."""

from __future__ import annotations

from loadtest.bench.native import WrkResult
from loadtest.bench.scaling import Pooled, Turn, format_table, ratios, verdict


def _turn(ok: int, refused: int = 0, errors: int = 0, seconds: float = 8.0) -> Turn:
    statuses = {200: ok, 429: refused}
    if errors:
        statuses[502] = errors
    return Turn(WrkResult(seconds, statuses, p50_ms=20.0, p99_ms=40.0, cpu_s=0.4),
                gateway_cores=1.0, nginx_cores=0.03)


def test_turns_pool_into_completions_per_second() -> None:
    one = Pooled(1, [_turn(14_000, refused=400), _turn(16_000)])
    assert one.completions_per_s == 30_000 / 16
    assert one.refused_per_s == 400 / 16
    assert one.wrk_cores == 0.8 / 16


def test_refusals_do_not_count_as_served() -> None:
    one = Pooled(1, [_turn(10_000, refused=5_000)])
    two = Pooled(2, [_turn(18_000)])
    assert ratios([one, two]) == {1: 1.0, 2: 1.8}


def test_the_verdict_wants_the_target_and_no_errors() -> None:
    one = Pooled(1, [_turn(10_000)])
    assert verdict([one, Pooled(2, [_turn(17_000)])], 1.7)[0]
    passed, reason = verdict([one, Pooled(2, [_turn(16_900)])], 1.7)
    assert not passed
    assert "1.69x" in reason
    passed, reason = verdict([one, Pooled(2, [_turn(19_000, errors=1)])], 1.7)
    assert not passed
    assert "1 errors" in reason


def test_the_table_has_a_row_per_count() -> None:
    table = format_table([Pooled(1, [_turn(8_000)]), Pooled(2, [_turn(15_200)])])
    lines = table.splitlines()
    assert len(lines) == 3
    assert lines[2].split()[:3] == ["2", "1,900", "1.90"]
