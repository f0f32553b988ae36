"""Overload control: how late the trio scheduler runs work, and how many requests to let in.

Owns :class:`Admission`. A CPU-bound gateway does not queue requests anywhere visible:
every accepted request becomes one more runnable task, and each pass of the scheduler
takes longer for all of them. A monitor task sleeps in short steps and measures how
late it wakes (the scheduler's lag) and how much of that time the event loop's thread
was running or waiting for a core (Linux's schedstat; its CPU time elsewhere). While
the smoothed lag is above ``threshold_s`` and the thread is saturated (busy for
``_SATURATED`` of the window or more) the
limit on requests in flight shrinks below what is in flight (x0.9 when the lag is just
over the threshold, down to x0.5 at twice it; the average weighs the newest sample 0.1,
so it takes ~10 late samples in a row), so new
completions are refused at the door (429 with ``retry-after``, before auth or body
parsing) and the requests already accepted keep their latency; while the lag is below
half the threshold the limit grows back until it no longer binds: +5 % a window near
the threshold, +25 % while the lag is under a quarter of it (a limit left low by an
earlier overload is back past 1,000 within 2 s instead of 6). The limit
moves at most once per ten samples (100 ms), so each move is seen before the next. A
single long stall (a garbage collection) counts for at most twice the threshold, so it
alone never shrinks the limit: overload is being late sample after sample.
Lag without saturation is not overload, and refusing would not help: bursts (a
thousand streams whose chunks come due together) make the scheduler late while the
gateway itself has time to spare. Waiting for a core counts as busy: when other
processes take the cores the gateway can serve less, and it must shed all the same.
The limit never falls below ``min_limit``, so the gateway always makes progress even
when refusing costs all the CPU. Open streams that only wait on their upstream cost no
CPU and do not raise the lag: thousands of idle streams are let in, a few hundred busy
requests on a saturated core are not.

A refusal tells the client when to come back (``retry_after_s``): about when the ones
ahead of it will be done. That is the requests in flight plus the refused clients that
will be back first, over the rate requests complete (Little's law). Until requests
have completed since the load began, there is no rate: the wait is the shortest one
(a burst of slow requests told 10 s would sit out long after there is room). A refusal is not
free (~0.4 ms of hypercorn's CPU, 40 % of a small request), so clients told to come back
too soon keep a saturated gateway busy refusing them: with a fixed short wait, a
thousand clients in a closed loop cut throughput five-fold.

Clients that ignore ``retry-after`` (wrk, hey, a retry loop without a pause) come back
the instant they are refused, as fast as they are refused: one saturated worker that
sheds under ``wrk -c50`` served 604 to 1,355 completions a second instead of 1,930, and
refused 3,500 to 8,400. With ``hold_max_s`` set (``AIRGATE_REFUSAL_HOLD_MS``), the
connection handler holds a refusal that comes back on the same connection before the
wait it was told (:meth:`Admission.hold`, until that wait is over or for
``hold_max_s``, whichever is sooner): a held refusal is a timer, not CPU, and such a
client then got 1,774 to 1,897 completions a second. It is off by default: an
open-loop generator that reuses a refused connection at once for its next arrival
looks the same from here, and holding its refusals made it open more connections (peaks
of up to 2,000 against 159 to 985) and failed the 2x overload check in 2 of 6 runs on
accepted p99s of 183 and 323 ms (without it, 49 to 63 ms in 3 of 3). At most
``HOLD_CAP`` are held at once (each holds a connection); past that they are answered at
once.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import trio

_STEP_S = 0.01  # how often the lag is sampled when the scheduler keeps up
_SMOOTHING = 0.1  # weight of the newest sample in the moving average (~10 samples)
_DECREASE = 0.9  # the gentlest cut, when the lag is just over the threshold
_DEEPEST_DECREASE = 0.5  # the deepest, when it is twice the threshold (samples' cap)
_INCREASE = 0.05
_FAST_INCREASE = 0.25
_UNLIMITED_ABOVE = 1_000_000.0  # a limit grown past this is dropped altogether
_RATE_SMOOTHING = 0.05  # completion and refusal rates: ~20 samples (~0.2 s)
_RATE_SAMPLES_KNOWN = 400  # past this many samples the start-up correction is nil
WAIT_S = (0.25, 10.0)  # the bounds of the wait a refused client is told
# The limit moves at most once per this many samples (the average's window): the effect
# of one move shows in the lag before the next (moving every sample overshot, down to a
# limit that left the CPU idle while refused clients waited).
_WINDOW = 10
# The event loop's thread running or waiting for a core for this share of a window or
# more: saturated. The lag alone also rises with bursts of work that the loop catches up.
_SATURATED = 0.9
_JITTER = 0.25  # +-25 %, so a burst refused together does not come back together
HOLD_CAP = 2048  # refusals held at once; past this many they are answered at once


class Admission:
    """Requests in flight, the lag-driven limit on them, and the door check.

    ``threshold_s`` 0 turns the control off (the limit stays infinite)."""

    __slots__ = ("_busy_sum", "_clock", "_completed", "_rate_samples", "_refused",
                 "_sampled_at", "_since", "arriving", "busy", "completion_rate", "held",
                 "hold_max_s", "inflight", "lag_s", "limit", "min_limit", "refusal_rate",
                 "threshold_s", "wait_s")

    def __init__(self, threshold_s: float, *, min_limit: int = 16, hold_max_s: float = 0.0,
                 clock: Callable[[], float] | None = None) -> None:
        self.threshold_s = threshold_s
        self.hold_max_s = hold_max_s  # longest hold of a refusal back too soon; 0: none
        # Seconds the thread that runs the event loop (and calls ``run``) has been busy;
        # None: ``busy_clock`` (running or waiting for a core).
        self._clock = clock
        self.busy = 0.0  # share of the last window the loop's thread was busy
        self._busy_sum = 0.0
        self.min_limit = float(min_limit)
        self.lag_s = 0.0
        self.limit = math.inf
        self.inflight = 0
        # Let in by the connection handler's early door and not yet at the app's: they
        # count against the limit, or a batch read together would all be let in there
        # and refused at the app's door, after hypercorn had parsed them (see ``arrive``).
        self.arriving = 0
        self.completion_rate = 0.0  # requests leaving per second (smoothed)
        self.refusal_rate = 0.0  # requests refused per second (smoothed)
        self.wait_s = WAIT_S[0]  # how long a client refused now should wait
        self.held = 0  # refusals being held before they are answered
        self._completed = 0
        self._refused = 0
        self._rate_samples = 0  # samples in completion_rate since requests began completing
        self._sampled_at = -math.inf
        self._since = 0

    @property
    def shedding(self) -> bool:
        """Whether a new request would be refused now."""
        return self.inflight >= self.limit

    @property
    def limited(self) -> bool:
        """Whether there is a limit at all (the control has engaged since it was last
        lifted): only then is it worth screening requests early."""
        return self.limit != math.inf

    def arrive(self) -> bool:
        """At the early door: count a request on its way in, unless those in flight and
        those on their way already reach the limit (then count it refused)."""
        if self.inflight + self.arriving >= self.limit:
            self._refused += 1
            return False
        self.arriving += 1
        return True

    def try_enter(self) -> bool:
        """Count a new request in, unless the limit is reached."""
        if self.arriving:
            self.arriving -= 1  # probably this one; an unmatched count is reset below
        if self.inflight >= self.limit:
            self._refused += 1
            return False
        self.inflight += 1
        return True

    def leave(self) -> None:
        self.inflight -= 1
        self._completed += 1

    def retry_after_s(self) -> float:
        """The wait to tell a client refused now, jittered."""
        return self.wait_s * random.uniform(1 - _JITTER, 1 + _JITTER)

    async def hold(self, seconds: float) -> None:
        """Hold a refusal ``seconds`` (at most ``hold_max_s``), counted in ``held``; at
        once (no checkpoint) when holds are off or ``HOLD_CAP`` are held."""
        if seconds <= 0 or self.hold_max_s <= 0 or self.held >= HOLD_CAP:
            return
        self.held += 1
        try:
            await trio.sleep(min(seconds, self.hold_max_s))
        finally:
            self.held -= 1

    def tally(self, now: float) -> None:
        """Fold the completions and refusals since the last call into their rates, and
        estimate the wait: those in flight plus the refused that come back first (the
        refusal rate times the wait), over the completion rate. A gateway refusing
        faster than it completes is told longer and longer waits, up to the bound."""
        elapsed = now - self._sampled_at
        self._sampled_at = now
        if not math.isfinite(elapsed) or elapsed <= 0:
            self._completed = self._refused = 0
            return
        if self.inflight == 0 and self._completed == 0:  # idle: the next burst starts afresh
            self.completion_rate = 0.0
            self._rate_samples = 0
        elif self._completed or self._rate_samples:
            self._rate_samples = min(self._rate_samples + 1, _RATE_SAMPLES_KNOWN)
        self.completion_rate += _RATE_SMOOTHING * (
            self._completed / elapsed - self.completion_rate)
        self.refusal_rate += _RATE_SMOOTHING * (self._refused / elapsed - self.refusal_rate)
        self._completed = self._refused = 0
        if self._rate_samples == 0:
            # Nothing has completed since the load began (a burst of requests that each
            # take a while): no rate to divide by. The shortest wait, not the longest:
            # a burst of clients told 10 s would sit out long after there is room.
            self.wait_s = WAIT_S[0]
            return
        # The average starts from zero, so its first samples are too low by this factor.
        rate = self.completion_rate / (1 - (1 - _RATE_SMOOTHING) ** self._rate_samples)
        ahead = self.inflight + self.refusal_rate * self.wait_s
        self.wait_s = min(WAIT_S[1], max(WAIT_S[0], ahead / max(rate, 1.0)))

    def observe(self, lag_s: float, busy: float = 1.0) -> None:
        """Fold one sample in (the lag, and the share of the step the loop's thread was
        running or waiting for a core) and move the limit.

        A sample counts for at most twice the threshold: one long stall (a garbage
        collection, a slow disk write) is not overload; being late sample after sample is.
        """
        lag_s = min(lag_s, 2 * self.threshold_s)
        self.lag_s += _SMOOTHING * (lag_s - self.lag_s)
        self._busy_sum += busy
        self._since += 1
        if self._since < _WINDOW:
            return
        self.busy = self._busy_sum / self._since
        self._since = 0
        self._busy_sum = 0.0
        # A request let in early reaches the app's door within a pass or two; one that
        # never does (its client left) must not hold room for long.
        self.arriving = 0
        if self.lag_s > self.threshold_s and self.busy >= _SATURATED:
            # Cut by how far over the threshold the lag is: x0.9 just over it, down to
            # x0.5 at twice it. At the onset of an overload the in-flight count is far
            # above what the gateway can serve in time; x0.9 a window took ~2 s to get
            # there, while the queue grew and clients opened connection after connection.
            cut = max(_DEEPEST_DECREASE, min(_DECREASE, self.threshold_s / self.lag_s))
            self.limit = max(self.min_limit, min(self.limit, self.inflight) * cut)
        elif self.lag_s < self.threshold_s / 2 and self.limit != math.inf:
            # Far below the threshold the limit is plainly too low (left over from an
            # earlier overload): grow it fast; near it, probe gently.
            fast = self.lag_s < self.threshold_s / 4
            self.limit += max(1.0, self.limit * (_FAST_INCREASE if fast else _INCREASE))
            if self.limit > _UNLIMITED_ABOVE:
                self.limit = math.inf

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample the lag until cancelled (returns at once when turned off)."""
        task_status.started()
        if self.threshold_s <= 0:
            return
        with busy_clock() as default_clock:
            clock = self._clock or default_clock
            then, busy_then = trio.current_time(), clock()
            while True:
                wake = then + _STEP_S
                await trio.sleep_until(wake)
                now, busy_now = trio.current_time(), clock()
                busy = min(1.0, (busy_now - busy_then) / (now - then)) if now > then else 1.0
                self.observe(max(0.0, now - wake), busy)
                self.tally(now)
                then, busy_then = now, busy_now


_SCHEDSTAT = "/proc/thread-self/schedstat"


@contextmanager
def busy_clock() -> Iterator[Callable[[], float]]:
    """A clock of the seconds the calling thread has spent running or waiting for a core
    (the first two fields of Linux's schedstat, in ns), or its CPU time where the kernel
    does not say. One ``pread`` a reading (~0.4 us)."""
    try:
        fd = os.open(_SCHEDSTAT, os.O_RDONLY)
    except OSError:
        yield time.thread_time
        return

    def clock() -> float:
        running, waiting = os.pread(fd, 128, 0).split()[:2]
        return (int(running) + int(waiting)) / 1e9

    try:
        try:
            clock()
        except (OSError, ValueError):
            yield time.thread_time
        else:
            yield clock
    finally:
        os.close(fd)
