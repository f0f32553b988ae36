"""Overload detection: how late the trio scheduler runs work, and when to shed.

Owns :class:`LagMonitor`. A CPU-bound gateway does not queue requests anywhere visible:
every accepted request becomes one more runnable task, and each pass of the scheduler
takes longer for all of them. The monitor sleeps in short steps and measures how late
it wakes (the scheduler's lag); while the smoothed lag is above ``threshold_s`` the
gateway refuses new completions at the door (429 with ``retry-after``, before auth or
body parsing), so the requests it has accepted keep their latency instead of everyone
queueing for seconds. Hysteresis (stop below half the threshold) keeps it from flapping.
Open streams that are only waiting on their upstream cost no CPU and never count: ten
thousand idle streams do not trip it, a few hundred busy requests do.
"""

from __future__ import annotations

import trio

_STEP_S = 0.01  # how often the lag is sampled when the scheduler keeps up
_SMOOTHING = 0.3  # weight of the newest sample in the moving average


class LagMonitor:
    """Smoothed scheduler lag and the shedding decision. ``threshold_s`` 0 disables it."""

    __slots__ = ("lag_s", "shedding", "threshold_s")

    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self.lag_s = 0.0
        self.shedding = False

    def observe(self, lag_s: float) -> None:
        """Fold one lag sample in and update ``shedding``."""
        self.lag_s += _SMOOTHING * (lag_s - self.lag_s)
        if self.shedding:
            if self.lag_s < self.threshold_s / 2:
                self.shedding = False
        elif self.lag_s > self.threshold_s:
            self.shedding = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample the lag until cancelled (returns at once when disabled)."""
        task_status.started()
        if self.threshold_s <= 0:
            return
        while True:
            wake = trio.current_time() + _STEP_S
            await trio.sleep_until(wake)
            self.observe(max(0.0, trio.current_time() - wake))
