"""Admission on the mock clock: lag shrinks the in-flight limit, recovery lifts it."""

from __future__ import annotations

import math
import time
from itertools import pairwise

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from workers.overload import HOLD_CAP, WAIT_S, Admission, busy_clock

HOLD_MAX_S = 0.05


def _busy(admission: Admission, n: int) -> None:
    for _ in range(n):
        assert admission.try_enter()


def test_no_lag_no_limit() -> None:
    admission = Admission(0.05)
    _busy(admission, 10_000)  # ten thousand idle streams: let in
    for _ in range(50):
        admission.observe(0.001)
    assert admission.limit == math.inf
    assert not admission.shedding


def test_lag_shrinks_the_limit_below_what_is_in_flight_then_it_grows_back() -> None:
    admission = Admission(0.05, min_limit=16)
    _busy(admission, 200)
    for _ in range(9):  # late, sample after sample: 0.08 x (1 - 0.9^n) is still < 0.05
        admission.observe(0.08)
        assert admission.limit == math.inf
    admission.observe(0.08)  # the tenth: 0.052
    assert admission.limit == 180  # 200 in flight x 0.9
    assert admission.shedding
    assert not admission.try_enter()
    for _ in range(9):  # still lagging, but the limit holds until the next window
        admission.observe(0.08)
        assert admission.limit == 180
    admission.observe(0.08)
    # 100 ms later, further over the threshold (smoothed 0.070): cut deeper, by 0.05/0.070.
    assert 0.07 < admission.lag_s < 0.071
    assert admission.limit == pytest.approx(180 * 0.05 / admission.lag_s)
    for _ in range(300):  # still lagging: the limit keeps falling, down to the floor
        admission.observe(0.08)
    assert admission.limit == 16
    for _ in range(190):
        admission.leave()  # the accepted requests finish
    assert admission.inflight == 10
    assert admission.try_enter()  # below the floor: always some progress
    while True:
        admission.observe(0.0)
        if admission.lag_s < 0.025:
            break
        assert admission.limit == 16  # lag between half and the threshold: hold
    for _ in range(10):  # below half: it grows at the next window
        admission.observe(0.0)
        if admission.limit != 16:
            break
    assert admission.limit in (17, 20)  # +max(1, 5 %), or +25 % below a quarter
    grown = [admission.limit]
    for _ in range(3000):
        admission.observe(0.0)
        grown.append(admission.limit)
    assert grown == sorted(grown)
    assert admission.limit == math.inf  # grown past a million: no limit at all


def _first_cut(lag_s: float) -> Admission:
    admission = Admission(0.05)
    _busy(admission, 100)
    while admission.limit == math.inf:
        admission.observe(lag_s)
    return admission


def test_the_cut_is_between_x09_and_x05_by_how_late_the_scheduler_is() -> None:
    barely = _first_cut(0.051)  # barely over the threshold: the gentlest cut
    assert barely.limit == pytest.approx(90)
    far = _first_cut(1.0)  # counted as 0.1, twice the threshold; smoothed 0.065 by then
    assert far.lag_s == pytest.approx(0.1 * (1 - 0.9 ** 10))
    assert far.limit == pytest.approx(100 * 0.05 / far.lag_s)
    limits = [far.limit]
    for _ in range(100):  # the smoothed lag nears the cap: x0.5 a window
        far.observe(1.0)
        limits.append(far.limit)
    moves = [b / a for a, b in pairwise(limits) if a != b and b > far.min_limit]
    assert moves
    assert all(0.5 - 1e-9 <= m <= 0.9 + 1e-9 for m in moves)
    assert far.limit == far.min_limit


def test_a_single_long_stall_does_not_limit() -> None:
    admission = Admission(0.05)
    _busy(admission, 100)
    admission.observe(1.5)  # a full garbage collection: counted as 0.1, smoothed 0.01
    assert admission.lag_s == 0.1 * 0.1
    assert admission.limit == math.inf


def test_lag_without_saturation_does_not_shrink_the_limit() -> None:
    # Late by bursts, or by other processes on the cores, while the loop's thread has
    # time to spare: refusing would not help.
    admission = Admission(0.05)
    _busy(admission, 100)
    for _ in range(50):
        admission.observe(0.08, busy=0.6)
    assert admission.lag_s > 0.05
    assert admission.busy == pytest.approx(0.6)
    assert admission.limit == math.inf
    for _ in range(10):  # the same lag with the thread saturated is overload
        admission.observe(0.08, busy=0.95)
    assert admission.limit == pytest.approx(100 * 0.05 / admission.lag_s)


async def test_the_monitor_measures_how_late_it_wakes(mock_clock: MockClock) -> None:
    # A loop thread on the CPU the whole time: its CPU clock runs with the wall clock.
    admission = Admission(0.05, clock=trio.current_time)
    _busy(admission, 100)
    async with trio.open_nursery() as nursery:
        await nursery.start(admission.run)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(10):  # the scheduler runs everything 80 ms late, ten times over
            mock_clock.jump(0.09)
            await trio.testing.wait_all_tasks_blocked()
        assert 0.05 < admission.lag_s < 0.06
        assert admission.limit == 90
        for _ in range(60):  # back to waking on time
            mock_clock.jump(0.01)
            await trio.testing.wait_all_tasks_blocked()
        assert admission.lag_s < 0.001
        assert admission.limit > 90
        nursery.cancel_scope.cancel()


async def test_threshold_zero_turns_it_off() -> None:
    admission = Admission(0.0)
    with trio.fail_after(1):
        await admission.run()  # returns at once: nothing to watch
    assert admission.limit == math.inf


def _sample(admission: Admission, now: float, completed: int, refused: int) -> None:
    """One 10 ms sample's worth of requests leaving and clients refused."""
    for _ in range(completed):
        admission.leave()
        assert admission.try_enter()  # the next one takes its place
    saved, admission.limit = admission.limit, 0
    for _ in range(refused):
        assert not admission.try_enter()
    admission.limit = saved
    admission.tally(now)


def test_a_refused_client_waits_until_those_ahead_are_done() -> None:
    """A closed loop: 1,000 clients, 300 in flight, 270 completing a second; the other 700
    come back when told. The wait settles where they come back about when there is room:
    (300 + 700) / 270 = 3.7 s, and refusals fall to ~190 a second (not 700 every second)."""
    admission = Admission(0.05)
    _busy(admission, 300)
    now, owed = 0.0, 0.0
    for step in range(3000):  # 30 s of 10 ms samples
        now = step * 0.01
        owed += 700 * 0.01 / admission.wait_s  # the refused clients' returns, on average
        refused = int(owed)
        owed -= refused
        _sample(admission, now, 3 if step % 10 else 0, refused)  # 2.7 per 10 ms
    assert 3.3 < admission.wait_s < 4.1
    assert 150 < admission.refusal_rate < 230
    assert abs(admission.completion_rate - 270) < 30


def test_refusing_faster_than_completing_asks_for_the_longest_wait() -> None:
    admission = Admission(0.05)
    _busy(admission, 50)
    for step in range(500):  # an open loop at twice capacity: 5 served, 5 refused per 10 ms
        _sample(admission, step * 0.01, 5, 5)
    assert admission.wait_s == WAIT_S[1]


def test_without_refusals_the_wait_is_the_time_to_clear_those_in_flight() -> None:
    admission = Admission(0.05)
    _busy(admission, 200)
    for step in range(500):  # 100 completing a second
        _sample(admission, step * 0.01, 1, 0)
    assert 1.8 < admission.wait_s < 2.2
    assert all(1.35 < admission.retry_after_s() < 2.75 for _ in range(100))  # +-25 %
    _busy(admission, 0)
    for _ in range(190):
        admission.leave()
    for step in range(500, 1000):  # 10 left in flight: 0.1 s, but never below the floor
        _sample(admission, step * 0.01, 1, 0)
    assert admission.wait_s == WAIT_S[0]


def test_a_burst_of_slow_requests_is_told_a_short_wait_until_they_complete() -> None:
    """1,000 clients arrive at once and every request takes 250 ms: for those 250 ms
    nothing completes, which is no evidence of a slow gateway. The refused are told the
    shortest wait, and once requests complete the estimate follows the measured rate
    at once (the rate's average starts from zero; its first samples are corrected)."""
    admission = Admission(0.05)
    _busy(admission, 600)
    for step in range(25):  # 250 ms, nothing done yet, 400 refused
        _sample(admission, step * 0.01, 0, 16)
        assert admission.wait_s == WAIT_S[0]
    for step in range(25, 30):  # then 24 complete every 10 ms: 2,400 a second
        _sample(admission, step * 0.01, 24, 0)
    # (600 in flight + refused coming back) / 2,400 a second: well under a second.
    assert WAIT_S[0] <= admission.wait_s < 0.6


def test_an_idle_gateway_forgets_the_last_burst_rate() -> None:
    admission = Admission(0.05)
    _busy(admission, 100)
    for step in range(100):
        _sample(admission, step * 0.01, 10, 0)
    _busy(admission, 0)
    for _ in range(100):
        admission.leave()
    for step in range(100, 110):  # idle for 100 ms
        admission.tally(step * 0.01)
    assert admission.completion_rate == 0.0
    _busy(admission, 500)  # a new burst: no completions yet, so the shortest wait
    admission.tally(1.2)
    assert admission.wait_s == WAIT_S[0]


def _steady(admission: Admission, lag_s: float, windows: int) -> list[float]:
    """The limit after each of ``windows`` 100 ms windows at a steady lag."""
    limits = []
    for _ in range(windows):
        for _ in range(10):
            admission.observe(lag_s)
        limits.append(admission.limit)
    return limits


def test_a_limit_left_low_by_an_earlier_overload_grows_back_fast_when_idle() -> None:
    """Far below the threshold (under a quarter) the limit grows 25 % a window, so a
    limit of 16 left by an overload is past 1,000 within 2 s; between a quarter and half
    of the threshold it probes 5 % a window."""
    admission = Admission(0.04, min_limit=16)
    admission.limit = 16.0
    gentle = _steady(admission, 0.015, 60)[30:]  # the average settles at 0.015: 5 %
    assert all(b / a == pytest.approx(1.05, rel=0.01) for a, b in pairwise(gentle))
    admission.limit = 16.0
    fast = _steady(admission, 0.0, 20)[5:]  # the average falls below 0.01: 25 %
    assert all(b / a == pytest.approx(1.25) for a, b in pairwise(fast))
    assert fast[-1] > 1000


def test_requests_let_in_early_count_against_the_limit_until_they_enter() -> None:
    """A batch read together at the early door: only as many as there is room for are
    let in (the rest refused there, cheaply), and each takes its room at the app's door."""
    admission = Admission(0.05)
    assert not admission.limited
    admission.limit = 10.0
    assert admission.limited
    _busy(admission, 7)
    assert [admission.arrive() for _ in range(5)] == [True, True, True, False, False]
    assert admission.arriving == 3
    assert all(admission.try_enter() for _ in range(3))  # the three reach the app's door
    assert (admission.inflight, admission.arriving) == (10, 0)
    assert not admission.try_enter()
    assert not admission.arrive()


def test_an_early_count_that_never_enters_lapses_within_a_window() -> None:
    admission = Admission(0.05)
    admission.limit = 2.0
    assert admission.arrive()
    assert admission.arrive()
    assert not admission.arrive()  # two on their way (their clients left before entering)
    for _ in range(10):
        admission.observe(0.0)  # one 100 ms window
    assert admission.arriving == 0
    assert admission.arrive()


async def test_the_monitor_measures_the_loop_threads_cpu(mock_clock: MockClock) -> None:
    cpu = [0.0]  # the thread's CPU clock: on the CPU for half of every step
    admission = Admission(0.05, clock=lambda: cpu[0])
    _busy(admission, 100)
    async with trio.open_nursery() as nursery:
        await nursery.start(admission.run)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(20):  # late by 80 ms each time, busy for half of it
            cpu[0] += 0.045
            mock_clock.jump(0.09)
            await trio.testing.wait_all_tasks_blocked()
        assert admission.lag_s > 0.05
        assert admission.busy == pytest.approx(0.5)
        assert admission.limit == math.inf  # late, but not saturated
        nursery.cancel_scope.cancel()


def test_the_busy_clock_runs_while_the_thread_works_and_stops_while_it_sleeps() -> None:
    # A real clock of this thread (Linux schedstat, or its CPU time): no mock stands in.
    with busy_clock() as clock:
        start = time.perf_counter()
        before = clock()
        while time.perf_counter() - start < 0.05:
            pass
        worked = clock() - before
        before = clock()
        time.sleep(0.05)
        slept = clock() - before
    assert 0.04 <= worked <= 0.2
    assert slept < 0.02


async def test_a_hold_sleeps_at_most_hold_max_and_counts_while_it_does(
    autojump_clock: MockClock,
) -> None:
    admission = Admission(0.005, hold_max_s=HOLD_MAX_S)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.hold, HOLD_MAX_S / 2)
        nursery.start_soon(admission.hold, 25.0)  # at most HOLD_MAX_S
        await trio.testing.wait_all_tasks_blocked()
        assert admission.held == 2
        await trio.sleep(HOLD_MAX_S * 0.75)
        assert admission.held == 1
    assert trio.current_time() == pytest.approx(HOLD_MAX_S)
    assert admission.held == 0
    await admission.hold(0.0)
    await admission.hold(-1.0)
    assert trio.current_time() == pytest.approx(HOLD_MAX_S)  # nothing to hold: no sleep


async def test_past_the_cap_refusals_are_not_held(autojump_clock: MockClock) -> None:
    admission = Admission(0.005, hold_max_s=HOLD_MAX_S)
    admission.held = HOLD_CAP
    await admission.hold(HOLD_MAX_S)
    assert trio.current_time() == 0.0
    admission.held = HOLD_CAP - 1
    await admission.hold(HOLD_MAX_S)
    assert trio.current_time() == pytest.approx(HOLD_MAX_S)
    assert admission.held == HOLD_CAP - 1


async def test_holds_are_off_by_default(autojump_clock: MockClock) -> None:
    admission = Admission(0.005)
    with trio.testing.assert_no_checkpoints():
        await admission.hold(0.3)
    assert trio.current_time() == 0.0
    assert admission.held == 0
