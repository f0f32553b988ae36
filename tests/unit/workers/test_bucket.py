"""TokenBucket and WindowLimits: exact arithmetic and the capacity invariant."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from workers.bucket import TokenBucket, WindowLimits


def test_starts_full() -> None:
    bucket = TokenBucket(10, 2, now=5.0)
    assert bucket.level(5.0) == 10.0
    assert bucket.capacity == 10.0
    assert bucket.refill_per_s == 2.0


def test_take_and_refill_exactly() -> None:
    bucket = TokenBucket(10, 2, now=0.0)
    assert bucket.try_take(10, 0.0)
    assert bucket.level(0.0) == 0.0
    assert not bucket.try_take(1, 0.0)
    assert bucket.level(0.25) == 0.5
    assert not bucket.try_take(1, 0.25)
    assert bucket.try_take(1, 0.5)
    assert bucket.level(0.5) == 0.0
    assert bucket.level(100.0) == 10.0  # refill stops at capacity


def test_delay_until_exact() -> None:
    bucket = TokenBucket(60, 1, now=0.0)
    assert bucket.delay_until(60, 0.0) == 0.0
    assert bucket.try_take(60, 0.0)
    assert bucket.delay_until(1, 0.0) == 1.0
    assert bucket.delay_until(30, 0.0) == 30.0
    assert bucket.delay_until(30, 10.0) == 20.0
    assert bucket.delay_until(60, 10.0) == 50.0
    assert bucket.delay_until(0, 10.0) == 0.0
    assert bucket.delay_until(61, 10.0) == math.inf  # more than the bucket can ever hold


def test_delay_until_without_refill_is_infinite() -> None:
    bucket = TokenBucket(5, 0, now=0.0)
    assert bucket.try_take(5, 0.0)
    assert bucket.delay_until(1, 1e9) == math.inf
    assert bucket.delay_until(0, 1e9) == 0.0


def test_amount_above_capacity_is_never_taken() -> None:
    bucket = TokenBucket(5, 1, now=0.0)
    assert not bucket.try_take(5.5, 0.0)
    assert bucket.level(0.0) == 5.0


def test_give_back_never_exceeds_capacity() -> None:
    bucket = TokenBucket(10, 1, now=0.0)
    assert bucket.try_take(4, 0.0)
    bucket.give_back(3, 1.0)  # refill 1 + refund 3 -> 10
    assert bucket.level(1.0) == 10.0
    bucket.give_back(100, 1.0)
    assert bucket.level(1.0) == 10.0


def test_debt_goes_negative_and_is_repaid_first() -> None:
    bucket = TokenBucket(10, 2, now=0.0)
    assert bucket.try_take(10, 0.0)
    bucket.take_debt(6, 0.0)
    assert bucket.level(0.0) == -6.0
    assert bucket.delay_until(4, 0.0) == 5.0
    assert not bucket.try_take(4, 4.5)
    assert bucket.try_take(4, 5.0)


def test_time_going_backwards_is_ignored() -> None:
    bucket = TokenBucket(10, 1, now=100.0)
    assert bucket.try_take(10, 100.0)
    assert bucket.level(50.0) == 0.0
    assert bucket.level(101.0) == 1.0


def test_waiting_the_delay_always_suffices() -> None:
    # 7 rpm: the refill rate 7/60 is not exact in binary.
    bucket = TokenBucket(7, 7 / 60, now=0.0)
    now = 0.0
    for _ in range(50):
        delay = bucket.delay_until(1, now)
        now += delay
        assert bucket.try_take(1, now), (now, delay)


def test_reconfigure_clips_to_the_new_capacity() -> None:
    bucket = TokenBucket(100, 10, now=0.0)
    bucket.reconfigure(20, 1, now=0.0)
    assert bucket.level(0.0) == 20.0
    assert bucket.try_take(20, 0.0)
    bucket.reconfigure(50, 5, now=2.0)  # 2 s at the old rate: 2 tokens
    assert bucket.level(2.0) == 2.0
    assert bucket.level(4.0) == 12.0


@pytest.mark.parametrize(
    ("capacity", "rate"), [(0, 1), (-1, 1), (math.inf, 1), (1, -1), (1, math.inf), (1, math.nan)]
)
def test_invalid_configuration(capacity: float, rate: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        TokenBucket(capacity, rate, now=0.0)


@pytest.mark.parametrize("amount", [-1.0, math.nan, math.inf])
def test_invalid_amounts(amount: float) -> None:
    bucket = TokenBucket(1, 1, now=0.0)
    for method in (bucket.try_take, bucket.delay_until, bucket.give_back, bucket.take_debt):
        with pytest.raises(ValueError, match="amount"):
            method(amount, 0.0)


# -- WindowLimits ---------------------------------------------------------------------------


def test_rpm_window() -> None:
    limits = WindowLimits(rpm=2, tpm=None, now=0.0)
    assert limits.try_acquire(10**9, 0.0)
    assert limits.try_acquire(0, 0.0)
    assert not limits.try_acquire(0, 0.0)
    assert limits.delay_until(0, 0.0) == 30.0  # 2 per minute: one every 30 s
    assert limits.try_acquire(0, 30.0)


def test_tpm_window_and_settle() -> None:
    limits = WindowLimits(rpm=None, tpm=600, now=0.0)  # 10 tokens per second
    assert limits.try_acquire(500, 0.0)
    assert limits.delay_until(200, 0.0) == 10.0
    limits.settle(500, 300, 0.0)  # used less than reserved: 200 back
    assert limits.tokens is not None
    assert limits.tokens.level(0.0) == 300.0
    assert limits.try_acquire(300, 0.0)
    limits.settle(300, 400, 0.0)  # used more: 100 of debt
    assert limits.tokens.level(0.0) == -100.0
    assert limits.delay_until(1, 0.0) == 10.1
    assert limits.delay_until(601, 0.0) == math.inf


def test_acquire_is_all_or_nothing() -> None:
    limits = WindowLimits(rpm=60, tpm=100, now=0.0)
    assert not limits.try_acquire(101, 0.0)
    assert limits.requests is not None
    assert limits.tokens is not None
    assert limits.requests.level(0.0) == 60.0
    assert limits.try_acquire(100, 0.0)
    assert not limits.try_acquire(1, 0.0)
    assert limits.requests.level(0.0) == 59.0
    limits.cancel(100, 0.0)
    assert limits.requests.level(0.0) == 60.0
    assert limits.tokens.level(0.0) == 100.0


def test_delay_is_the_larger_of_both_windows() -> None:
    limits = WindowLimits(rpm=1, tpm=60, now=0.0)
    assert limits.try_acquire(60, 0.0)
    assert limits.delay_until(30, 0.0) == 60.0  # rpm needs 60 s, tpm 30 s


def test_unlimited() -> None:
    limits = WindowLimits(rpm=None, tpm=None, now=0.0)
    for _ in range(1000):
        assert limits.try_acquire(10**12, 0.0)
    limits.settle(1, 10**12, 0.0)
    limits.cancel(5, 0.0)
    assert limits.delay_until(10**12, 0.0) == 0.0


@pytest.mark.parametrize(("rpm", "tpm"), [(0, None), (None, 0), (-5, 10)])
def test_limits_must_be_positive(rpm: int | None, tpm: int | None) -> None:
    with pytest.raises(ValueError, match="positive"):
        WindowLimits(rpm=rpm, tpm=tpm, now=0.0)


# -- properties -----------------------------------------------------------------------------

amounts = st.floats(0, 200, allow_nan=False)
steps = st.floats(0, 30, allow_nan=False)


class BucketMachine(RuleBasedStateMachine):
    """Any sequence of operations keeps the level at or below capacity."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.bucket = TokenBucket(100, 3, now=self.now)

    @rule(dt=steps)
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(amount=amounts)
    def try_take(self, amount: float) -> None:
        before = self.bucket.level(self.now)
        taken = self.bucket.try_take(amount, self.now)
        after = self.bucket.level(self.now)
        if taken:
            assert after == pytest.approx(before - amount)
        else:
            assert after == before
            assert amount > before

    @rule(amount=amounts)
    def give_back(self, amount: float) -> None:
        self.bucket.give_back(amount, self.now)

    @rule(amount=amounts)
    def take_debt(self, amount: float) -> None:
        self.bucket.take_debt(amount, self.now)

    @precondition(lambda self: self.bucket.level(self.now) < 100)
    @rule(amount=st.floats(0, 100, allow_nan=False))
    def wait_then_take(self, amount: float) -> None:
        delay = self.bucket.delay_until(amount, self.now)
        assert math.isfinite(delay)
        self.now += delay
        assert self.bucket.try_take(amount, self.now)

    @rule(dt=st.floats(-50, 0, allow_nan=False))
    def read_in_the_past(self, dt: float) -> None:
        self.bucket.level(self.now + dt)

    @invariant()
    def never_above_capacity(self) -> None:
        assert self.bucket.level(self.now) <= self.bucket.capacity


TestBucketMachine = BucketMachine.TestCase


@given(
    st.integers(1, 10_000),
    st.lists(st.tuples(st.sampled_from(["take", "back", "debt"]), amounts, steps), max_size=50),
)
def test_op_list_never_exceeds_capacity(capacity: int, ops: list[tuple[str, float, float]]) -> None:
    bucket = TokenBucket(capacity, capacity / 60, now=0.0)
    now = 0.0
    for op, amount, dt in ops:
        now += dt
        if op == "take":
            bucket.try_take(amount, now)
        elif op == "back":
            bucket.give_back(amount, now)
        else:
            bucket.take_debt(amount, now)
        assert bucket.level(now) <= capacity
