"""Admission on the mock clock: lag shrinks the in-flight limit, recovery lifts it."""

from __future__ import annotations

import math

import trio
import trio.testing
from trio.testing import MockClock

from workers.overload import Admission


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
    for _ in range(100):  # still lagging: the limit keeps falling, down to the floor
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
    assert admission.limit == 17  # below half: +max(1, 5 %)
    grown = [admission.limit]
    for _ in range(300):
        admission.observe(0.0)
        grown.append(admission.limit)
    assert grown == sorted(grown)
    assert admission.limit == math.inf  # grown past a million: no limit at all


def test_a_single_long_stall_does_not_limit() -> None:
    admission = Admission(0.05)
    _busy(admission, 100)
    admission.observe(1.5)  # a full garbage collection: counted as 0.1, smoothed 0.01
    assert admission.lag_s == 0.1 * 0.1
    assert admission.limit == math.inf


async def test_the_monitor_measures_how_late_it_wakes(mock_clock: MockClock) -> None:
    admission = Admission(0.05)
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
