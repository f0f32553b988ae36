"""Overload control: how late the trio scheduler runs work, and how many requests to let in.

Owns :class:`Admission`. A CPU-bound gateway does not queue requests anywhere visible:
every accepted request becomes one more runnable task, and each pass of the scheduler
takes longer for all of them. A monitor task sleeps in short steps and measures how
late it wakes (the scheduler's lag). While the smoothed lag is above ``threshold_s`` the
limit on requests in flight shrinks below what is in flight (x0.9 per sample; the
average weighs the newest sample 0.1, so it takes ~10 late samples in a row), so new
completions are refused at the door (429 with ``retry-after``, before auth or body
parsing) and the requests already accepted keep their latency; while the lag is below
half the threshold the limit grows back (+5 % per sample) until it no longer binds. A
single long stall (a garbage collection) counts for at most twice the threshold, so it
alone never shrinks the limit: overload is being late sample after sample.
The limit never falls below ``min_limit``, so the gateway always makes progress even
when refusing costs all the CPU. Open streams that only wait on their upstream cost no
CPU and do not raise the lag: thousands of idle streams are let in, a few hundred busy
requests on a saturated core are not.
"""

from __future__ import annotations

import math

import trio

_STEP_S = 0.01  # how often the lag is sampled when the scheduler keeps up
_SMOOTHING = 0.1  # weight of the newest sample in the moving average (~10 samples)
_DECREASE = 0.9
_INCREASE = 0.05
_UNLIMITED_ABOVE = 1_000_000.0  # a limit grown past this is dropped altogether


class Admission:
    """Requests in flight, the lag-driven limit on them, and the door check.

    ``threshold_s`` 0 turns the control off (the limit stays infinite)."""

    __slots__ = ("inflight", "lag_s", "limit", "min_limit", "threshold_s")

    def __init__(self, threshold_s: float, *, min_limit: int = 16) -> None:
        self.threshold_s = threshold_s
        self.min_limit = float(min_limit)
        self.lag_s = 0.0
        self.limit = math.inf
        self.inflight = 0

    @property
    def shedding(self) -> bool:
        """Whether a new request would be refused now."""
        return self.inflight >= self.limit

    def try_enter(self) -> bool:
        """Count a new request in, unless the limit is reached."""
        if self.inflight >= self.limit:
            return False
        self.inflight += 1
        return True

    def leave(self) -> None:
        self.inflight -= 1

    def observe(self, lag_s: float) -> None:
        """Fold one lag sample in and move the limit.

        A sample counts for at most twice the threshold: one long stall (a garbage
        collection, a slow disk write) is not overload; being late sample after sample is.
        """
        lag_s = min(lag_s, 2 * self.threshold_s)
        self.lag_s += _SMOOTHING * (lag_s - self.lag_s)
        if self.lag_s > self.threshold_s:
            self.limit = max(self.min_limit, min(self.limit, self.inflight) * _DECREASE)
        elif self.lag_s < self.threshold_s / 2 and self.limit != math.inf:
            self.limit += max(1.0, self.limit * _INCREASE)
            if self.limit > _UNLIMITED_ABOVE:
                self.limit = math.inf

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample the lag until cancelled (returns at once when turned off)."""
        task_status.started()
        if self.threshold_s <= 0:
            return
        while True:
            wake = trio.current_time() + _STEP_S
            await trio.sleep_until(wake)
            self.observe(max(0.0, trio.current_time() - wake))
