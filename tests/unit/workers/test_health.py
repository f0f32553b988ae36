"""KeyHealth transitions at explicit times, with exact boundaries."""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.failure import FailureClass
from workers.health import HealthState, KeyHealth

F = FailureClass
H = HealthState


def _fail(health: KeyHealth, now: float, kind: FailureClass = F.TRANSIENT) -> None:
    health.begin(now)
    health.record_failure(kind, now)


def test_starts_healthy() -> None:
    health = KeyHealth(100.0)
    assert health.state(100.0) is H.HEALTHY
    assert health.available(100.0)
    assert health.retry_after(100.0) == 0.0
    assert health.disabled_reason is None


def test_transient_failure_cools_for_exactly_the_base_cooldown() -> None:
    health = KeyHealth(0.0, base_cooldown_s=1.0)
    _fail(health, 10.0)
    assert health.state(10.0) is H.COOLING
    assert not health.available(10.0)
    assert health.retry_after(10.5) == 0.5
    assert health.available_at(10.0) == 11.0
    assert not health.available(math.nextafter(11.0, 0.0))
    assert health.available(11.0)
    assert health.state(11.0) is H.HEALTHY


def test_backoff_doubles_and_is_capped() -> None:
    health = KeyHealth(0.0, failure_threshold=100, base_cooldown_s=1.0, max_cooldown_s=10.0)
    now = 0.0
    cooldowns = []
    for _ in range(6):
        _fail(health, now)
        wait = health.retry_after(now)
        assert wait is not None
        cooldowns.append(wait)
        now += wait
        assert health.available(now)
    assert cooldowns == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert health.consecutive_failures == 6


def test_success_resets_the_streak() -> None:
    health = KeyHealth(0.0)
    _fail(health, 0.0)
    _fail(health, 1.0)
    assert health.consecutive_failures == 2
    health.begin(3.0)
    health.record_success(3.5)
    assert health.consecutive_failures == 0
    _fail(health, 4.0)
    assert health.retry_after(4.0) == 1.0  # back to the base cool-down


def test_threshold_opens_then_half_open_admits_one_probe() -> None:
    health = KeyHealth(0.0, failure_threshold=3, base_cooldown_s=1.0, open_s=30.0)
    _fail(health, 0.0)  # cooling until 1
    _fail(health, 1.0)  # cooling until 3
    _fail(health, 3.0)  # third consecutive: open until 33
    assert health.state(3.0) is H.OPEN
    assert health.retry_after(3.0) == 30.0
    assert not health.available(32.999)
    assert health.state(33.0) is H.HALF_OPEN
    assert health.available(33.0)
    assert health.available(33.0)  # asking does not consume the probe
    health.begin(33.0)
    assert not health.available(33.0)
    assert health.retry_after(40.0) is None  # depends on the probe
    with pytest.raises(RuntimeError):
        health.begin(40.0)
    health.record_success(41.0)
    assert health.state(41.0) is H.HEALTHY
    assert health.consecutive_failures == 0


def test_failed_probe_reopens() -> None:
    health = KeyHealth(0.0, failure_threshold=1, open_s=30.0)
    _fail(health, 0.0, F.TIMEOUT)
    assert health.state(0.0) is H.OPEN
    health.begin(30.0)
    health.record_failure(F.CONNECT, 35.0)
    assert health.state(35.0) is H.OPEN
    assert health.retry_after(35.0) == 30.0
    assert health.state(65.0) is H.HALF_OPEN
    assert health.available(65.0)


def test_rate_limit_cools_for_the_larger_of_retry_after_and_backoff() -> None:
    health = KeyHealth(0.0, base_cooldown_s=1.0)
    health.begin(0.0)
    health.record_failure(F.RATE_LIMITED, 0.0, retry_after_s=7.0)
    assert health.state(0.0) is H.COOLING
    assert health.retry_after(0.0) == 7.0
    assert health.available(7.0)
    health.begin(7.0)
    health.record_failure(F.RATE_LIMITED, 7.0, retry_after_s=0.5)
    assert health.retry_after(7.0) == 2.0  # second rate limit in a row: back-off 2 > 0.5
    health.begin(9.0)
    health.record_failure(F.RATE_LIMITED, 9.0)
    assert health.retry_after(9.0) == 4.0


def test_rate_limits_never_open_the_circuit() -> None:
    health = KeyHealth(0.0, failure_threshold=2, max_cooldown_s=8.0)
    now = 0.0
    for _ in range(10):
        _fail(health, now, F.RATE_LIMITED)
        assert health.state(now) is H.COOLING
        wait = health.retry_after(now)
        assert wait is not None
        now += wait
    assert health.consecutive_failures == 0
    assert health.consecutive_rate_limits == 10
    assert health.retry_after(now - 8.0) == 8.0


def test_transient_failure_honours_retry_after() -> None:
    health = KeyHealth(0.0, base_cooldown_s=1.0)
    health.begin(0.0)
    health.record_failure(F.TRANSIENT, 0.0, retry_after_s=5.0)
    assert health.retry_after(0.0) == 5.0


def test_concurrent_failures_count_as_one_incident() -> None:
    health = KeyHealth(0.0, failure_threshold=3)
    for _ in range(5):
        health.begin(0.0)
    for t in (1.0, 1.1, 1.2, 1.3, 1.4):
        health.record_failure(F.TRANSIENT, t)
    assert health.consecutive_failures == 1
    assert health.state(1.4) is H.COOLING
    assert health.retry_after(1.4) == pytest.approx(0.6)


def test_stale_rate_limit_extends_cooling_to_its_retry_after() -> None:
    health = KeyHealth(0.0)
    health.begin(0.0)
    health.begin(0.0)
    health.record_failure(F.TRANSIENT, 1.0)  # cooling until 2
    health.record_failure(F.RATE_LIMITED, 1.5, retry_after_s=10.0)
    assert health.retry_after(1.5) == 10.0
    assert health.consecutive_rate_limits == 0


@pytest.mark.parametrize("kind", [F.CREDENTIAL, F.QUOTA])
def test_credential_and_quota_disable_until_enabled(kind: FailureClass) -> None:
    health = KeyHealth(0.0)
    _fail(health, 0.0, kind)
    assert health.state(0.0) is H.DISABLED
    assert health.disabled_reason == kind.value
    assert health.retry_after(1e9) is None
    assert not health.available(1e9)
    health.record_success(1e9)  # a late success of an older request does not re-enable
    assert health.state(1e9) is H.DISABLED
    with pytest.raises(RuntimeError):
        health.begin(1e9)
    health.enable(2e9)
    assert health.state(2e9) is H.HEALTHY
    assert health.disabled_reason is None


def test_manual_disable_and_enable() -> None:
    health = KeyHealth(0.0, failure_threshold=1)
    _fail(health, 0.0)
    health.disable("admin")
    assert health.state(100.0) is H.DISABLED
    assert health.disabled_reason == "admin"
    health.enable(100.0)
    assert health.available(100.0)
    assert health.consecutive_failures == 0


@pytest.mark.parametrize("kind", [F.CALLER, F.MODEL_NOT_FOUND])
def test_caller_faults_and_unknown_models_do_not_count(kind: FailureClass) -> None:
    health = KeyHealth(0.0, failure_threshold=1)
    for t in range(20):
        _fail(health, float(t), kind)
        assert health.state(float(t)) is H.HEALTHY


def test_caller_fault_on_the_probe_frees_the_probe_slot() -> None:
    health = KeyHealth(0.0, failure_threshold=1, open_s=10.0)
    _fail(health, 0.0)
    health.begin(10.0)
    assert not health.available(10.0)
    health.record_failure(F.CALLER, 11.0)
    assert health.state(11.0) is H.HALF_OPEN
    assert health.available(11.0)


def test_success_while_open_closes_the_circuit() -> None:
    health = KeyHealth(0.0, failure_threshold=1)
    health.begin(0.0)
    health.begin(0.0)
    health.record_failure(F.TRANSIENT, 1.0)
    assert health.state(1.0) is H.OPEN
    health.record_success(2.0)  # the other request got through: the key works
    assert health.state(2.0) is H.HEALTHY


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        KeyHealth(0.0, failure_threshold=0)
    with pytest.raises(ValueError, match="cooldown"):
        KeyHealth(0.0, base_cooldown_s=2.0, max_cooldown_s=1.0)
    with pytest.raises(ValueError, match="open_s"):
        KeyHealth(0.0, open_s=0.0)


_events = st.lists(
    st.tuples(
        st.sampled_from(["begin", "ok", "enable", *list(FailureClass)]),
        st.floats(0.0, 100.0),
        st.one_of(st.none(), st.floats(0.0, 100.0)),
    ),
    max_size=60,
)


@given(_events)
def test_invariants_under_any_history(events: list[tuple[object, float, float | None]]) -> None:
    health = KeyHealth(0.0, failure_threshold=3, base_cooldown_s=1.0, max_cooldown_s=8.0)
    now = 0.0
    for op, dt, retry in events:
        now += dt
        if op == "begin":
            if health.available(now):
                health.begin(now)
        elif op == "ok":
            health.record_success(now)
        elif op == "enable":
            health.enable(now)
        else:
            assert isinstance(op, FailureClass)
            health.record_failure(op, now, retry)
        state = health.state(now)
        wait = health.retry_after(now)
        assert health.available(now) == (wait == 0.0)
        if state in (H.COOLING, H.OPEN):
            assert wait is not None
            # At most the longest wait given (100 s), up to rounding: (now + 100) - now
            # can come out an ulp of ``now`` above 100 (hypothesis found 100.00000000000001).
            assert 0 < wait <= 100.0 + 1e-9
            at = health.available_at(now)
            assert at is not None
            assert copy.deepcopy(health).available(at)
            assert not copy.deepcopy(health).available(math.nextafter(at, -math.inf))
        assert (state is H.DISABLED) == (health.disabled_reason is not None)
        assert health.consecutive_failures < 3 or state in (H.OPEN, H.HALF_OPEN, H.DISABLED)
