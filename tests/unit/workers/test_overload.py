"""LagMonitor on the mock clock: a stalled scheduler turns shedding on, recovery off."""

from __future__ import annotations

import trio
import trio.testing
from trio.testing import MockClock

from workers.overload import LagMonitor


def test_shedding_starts_above_the_threshold_and_stops_below_half_of_it() -> None:
    monitor = LagMonitor(0.05)
    for _ in range(20):
        monitor.observe(0.02)  # busy but keeping up
    assert not monitor.shedding
    monitor.observe(0.5)  # one long stall: 0.02 + 0.3 * 0.48
    assert monitor.lag_s > 0.05
    assert monitor.shedding
    while monitor.lag_s >= 0.025:
        assert monitor.shedding  # hysteresis: still on between half and the threshold
        monitor.observe(0.0)
    assert not monitor.shedding


def test_a_single_short_hiccup_does_not_shed() -> None:
    monitor = LagMonitor(0.05)
    monitor.observe(0.1)  # smoothed: 0.03
    assert not monitor.shedding


async def test_the_monitor_measures_how_late_it_wakes(mock_clock: MockClock) -> None:
    clock = mock_clock  # time moves only when the test jumps it
    monitor = LagMonitor(0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        await trio.testing.wait_all_tasks_blocked()
        clock.jump(0.5)  # the scheduler ran nothing for half a second
        await trio.testing.wait_all_tasks_blocked()
        assert monitor.shedding
        assert 0.14 < monitor.lag_s < 0.15  # 0.3 x (0.5 - 0.01)
        for _ in range(30):  # back to waking on time
            clock.jump(0.01)
            await trio.testing.wait_all_tasks_blocked()
        assert not monitor.shedding
        assert monitor.lag_s < 0.001
        nursery.cancel_scope.cancel()


async def test_threshold_zero_turns_it_off() -> None:
    monitor = LagMonitor(0.0)
    with trio.fail_after(1):
        await monitor.run()  # returns at once: nothing to watch
    assert not monitor.shedding
