"""Failed-login throttling, with explicit times."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from workers.throttle import FailureThrottle


def test_the_limit_th_failure_blocks_until_the_oldest_leaves_the_window() -> None:
    throttle = FailureThrottle(limit=3, window_s=60)
    for t in (0.0, 10.0, 20.0):
        assert throttle.retry_after("a", t) is None
        throttle.failed("a", t)
    assert throttle.retry_after("a", 30.0) == 30.0  # the failure at 0 expires at 60
    assert throttle.retry_after("a", 60.0) is None
    assert throttle.retry_after("b", 30.0) is None  # other keys are not affected


def test_success_clears_the_account() -> None:
    throttle = FailureThrottle(limit=2, window_s=60)
    throttle.failed("a", 0.0)
    throttle.failed("a", 1.0)
    assert throttle.retry_after("a", 2.0) is not None
    throttle.succeeded("a")
    assert throttle.retry_after("a", 2.0) is None


def test_memory_is_bounded() -> None:
    throttle = FailureThrottle(limit=1, window_s=60, max_keys=10)
    for i in range(100):
        throttle.failed(f"k{i}", 0.0)
    assert throttle.retry_after("k0", 1.0) is None
    assert throttle.retry_after("k99", 1.0) == 59.0


@given(st.lists(st.floats(min_value=0, max_value=1000), max_size=50),
       st.floats(min_value=0, max_value=1100))
def test_blocked_exactly_when_limit_failures_are_inside_the_window(
    times: list[float], now: float
) -> None:
    throttle = FailureThrottle(limit=3, window_s=60)
    past = sorted(t for t in times if t <= now)
    for t in past:
        throttle.failed("k", t)
    recent = [t for t in past if t > now - 60]
    blocked = throttle.retry_after("k", now) is not None
    assert blocked == (len(recent) >= 3)
