"""Per-upstream-key health: a pure state machine driven by explicit ``now`` values.

Owns :class:`HealthState` and :class:`KeyHealth`. The key actor feeds it the start and the
classified result (see :mod:`workers.failure`) of every request made with the key, and asks
it whether the key may take the next request. No I/O, no clock reads, no trio: time is
always the caller's ``now`` (seconds on any monotonic clock).

States and transitions::

    healthy  --RATE_LIMITED-->            cooling  (max(retry_after, rate back-off))
    healthy  --TRANSIENT/TIMEOUT/CONNECT-> cooling  (max(retry_after, base * 2**(n-1) capped))
                                          or open  when n reaches failure_threshold
    cooling  --time reaches the end-->    healthy  (the failure streak is kept)
    open     --time reaches the end-->    half_open (admits exactly one probe)
    half_open --probe fails-->            open again
    any but disabled --success-->         healthy  (every streak reset)
    any      --CREDENTIAL/QUOTA-->        disabled (until :meth:`KeyHealth.enable`)

Rules that are not obvious from the diagram:

* Results that arrive while the key is cooling or open cannot belong to a request that
  started in that state (:meth:`KeyHealth.begin` refuses then), so they are *stale*: the
  request started before the penalty began. Stale failures do not lengthen the streak
  (ten concurrent requests failing together are one incident, not ten); a stale 429 only
  pushes the end of the penalty out to honour its ``Retry-After``.
* Any success, stale or not, is evidence that the key works and resets it to healthy.
* In half-open every failure re-opens the circuit (a stale one too: conservative). CALLER
  and MODEL_NOT_FOUND results say nothing about the key; in half-open they only free the
  probe slot so that another probe may go.
* Rate limits have their own streak for back-off and never open the circuit: the key is
  alive, it is just busy.
"""

from __future__ import annotations

import math
from enum import StrEnum

from workers.failure import FailureClass


class HealthState(StrEnum):
    HEALTHY = "healthy"
    COOLING = "cooling"
    OPEN = "open"
    HALF_OPEN = "half_open"
    DISABLED = "disabled"


_COUNTED = frozenset({FailureClass.TRANSIENT, FailureClass.TIMEOUT, FailureClass.CONNECT})
_DISABLING = frozenset({FailureClass.CREDENTIAL, FailureClass.QUOTA})
_NEUTRAL = frozenset({FailureClass.CALLER, FailureClass.MODEL_NOT_FOUND})


class KeyHealth:
    """Health of one upstream key. See the module docstring for the state machine."""

    def __init__(
        self,
        now: float,
        *,
        failure_threshold: int = 5,
        base_cooldown_s: float = 1.0,
        max_cooldown_s: float = 60.0,
        open_s: float = 30.0,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if not (0 < base_cooldown_s <= max_cooldown_s) or not math.isfinite(max_cooldown_s):
            raise ValueError("need 0 < base_cooldown_s <= max_cooldown_s < inf")
        if not (0 < open_s < math.inf):
            raise ValueError("open_s must be positive and finite")
        self.failure_threshold = failure_threshold
        self.base_cooldown_s = base_cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.open_s = open_s
        self.disabled_reason: str | None = None
        self._state = HealthState.HEALTHY
        self._until = now  # end of cooling/open; meaningless in other states
        self._failures = 0  # consecutive transient/timeout/connect incidents
        self._rate_limits = 0  # consecutive rate-limit incidents
        self._probe_in_flight = False

    # -- queries ---------------------------------------------------------------------------

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @property
    def consecutive_rate_limits(self) -> int:
        return self._rate_limits

    def state(self, now: float) -> HealthState:
        """The state at ``now``, after applying any time-driven transition."""
        self._advance(now)
        return self._state

    def available(self, now: float) -> bool:
        """Whether the key may take a new request at ``now``."""
        self._advance(now)
        if self._state is HealthState.HEALTHY:
            return True
        if self._state is HealthState.HALF_OPEN:
            return not self._probe_in_flight
        return False

    def retry_after(self, now: float) -> float | None:
        """Seconds until the key may be available again.

        0.0 when available now; the remaining cool-down or open period when penalised; None
        when no time is known (disabled, or a half-open probe is still in flight).
        """
        at = self.available_at(now)
        return None if at is None else at - now

    def available_at(self, now: float) -> float | None:
        """Like :meth:`retry_after` but as an absolute time, for ``trio.sleep_until``.

        Prefer this for waiting: ``now + retry_after(now)`` can round to just before the
        end of the penalty, while this value is exactly where it ends.
        """
        if self.available(now):
            return now
        if self._state in (HealthState.COOLING, HealthState.OPEN):
            return self._until
        return None

    # -- events ----------------------------------------------------------------------------

    def begin(self, now: float) -> None:
        """A request is about to use the key. In half-open this request is the probe.

        Raises RuntimeError if the key is not :meth:`available` (a caller bug).
        """
        if not self.available(now):
            raise RuntimeError(f"key is not available ({self._state.value})")
        if self._state is HealthState.HALF_OPEN:
            self._probe_in_flight = True

    def record_success(self, now: float) -> None:
        """A request made with the key succeeded."""
        self._advance(now)
        if self._state is HealthState.DISABLED:
            return
        self._reset(HealthState.HEALTHY, now)

    def record_failure(
        self, kind: FailureClass, now: float, retry_after_s: float | None = None
    ) -> None:
        """A request made with the key failed with the classified ``kind``."""
        self._advance(now)
        if self._state is HealthState.DISABLED:
            return
        if kind in _DISABLING:
            self.disable(kind.value)
        elif kind in _NEUTRAL:
            self._probe_in_flight = False
        elif self._state is HealthState.HALF_OPEN:
            self._open(now, retry_after_s)
        elif self._state is not HealthState.HEALTHY:  # stale result of a pre-penalty request
            if kind is FailureClass.RATE_LIMITED and retry_after_s is not None:
                self._until = max(self._until, now + retry_after_s)
        elif kind is FailureClass.RATE_LIMITED:
            self._rate_limits += 1
            wait = self._backoff(self._rate_limits)
            if retry_after_s is not None:
                wait = max(wait, retry_after_s)
            self._state = HealthState.COOLING
            self._until = now + wait
        elif kind in _COUNTED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open(now, retry_after_s)
            else:
                wait = self._backoff(self._failures)
                if retry_after_s is not None:  # e.g. a 503 that says when to come back
                    wait = max(wait, retry_after_s)
                self._state = HealthState.COOLING
                self._until = now + wait
        else:  # pragma: no cover - every FailureClass member is handled above
            raise AssertionError(kind)

    def abandon(self, now: float) -> None:
        """A request ended with no verdict on the key (its client left before any answer).

        Frees a half-open probe slot so another request can probe; changes nothing else.
        """
        self._advance(now)
        self._probe_in_flight = False

    def disable(self, reason: str) -> None:
        """Take the key out of rotation until :meth:`enable` (credential/quota, or an admin)."""
        self._state = HealthState.DISABLED
        self.disabled_reason = reason
        self._probe_in_flight = False

    def enable(self, now: float) -> None:
        """Put the key back into rotation as healthy, forgetting all history."""
        self._reset(HealthState.HEALTHY, now)

    # -- internals -------------------------------------------------------------------------

    def _backoff(self, n: int) -> float:
        # Cap the exponent as well so a long streak cannot overflow the float.
        return min(self.max_cooldown_s, self.base_cooldown_s * 2.0 ** min(n - 1, 1023))

    def _open(self, now: float, retry_after_s: float | None) -> None:
        self._state = HealthState.OPEN
        self._probe_in_flight = False
        self._until = now + max(self.open_s, retry_after_s or 0.0)

    def _reset(self, state: HealthState, now: float) -> None:
        self._state = state
        self._until = now
        self._failures = 0
        self._rate_limits = 0
        self._probe_in_flight = False
        self.disabled_reason = None

    def _advance(self, now: float) -> None:
        if now < self._until:
            return
        if self._state is HealthState.COOLING:
            self._state = HealthState.HEALTHY
        elif self._state is HealthState.OPEN:
            self._state = HealthState.HALF_OPEN
            self._probe_in_flight = False
