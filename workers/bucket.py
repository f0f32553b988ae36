"""Token buckets for request and token rate limits, as pure values driven by ``now``.

Owns :class:`TokenBucket` and :class:`WindowLimits` (the rpm + tpm pair used per user,
per API key and per upstream key). No I/O, no clock reads, no trio: every method takes the
caller's ``now`` (seconds on a monotonic clock), which makes the arithmetic testable with
exact values. An actor owns each instance and turns :meth:`TokenBucket.delay_until` into a
``trio.sleep_until``.

Invariant: the level never exceeds the capacity. It may go negative through
:meth:`TokenBucket.take_debt` (real usage turned out larger than the reservation); the
debt is then repaid by refill before anything else can be taken.

Floating point: a caller that sleeps exactly :meth:`TokenBucket.delay_until` seconds must
then succeed, but ``level + delay * rate`` can land a few ulps short of ``amount``.
:meth:`TokenBucket.try_take` therefore accepts a shortfall of at most
``1e-9 * max(1, capacity)``; the level then sits that far below zero, which refill repays.
"""

from __future__ import annotations

import math


def _check_amount(amount: float) -> None:
    if not (amount >= 0) or math.isinf(amount):  # also rejects NaN
        raise ValueError(f"amount must be finite and >= 0, got {amount!r}")


class TokenBucket:
    """A bucket of ``capacity`` tokens refilled continuously at ``refill_per_s``; starts full.

    Time that goes backwards (``now`` smaller than a previous call's) is ignored: it neither
    refills nor drains the bucket.
    """

    __slots__ = ("_capacity", "_last", "_level", "_rate", "_tolerance")

    def __init__(self, capacity: float, refill_per_s: float, now: float) -> None:
        self._capacity = 0.0
        self._rate = 0.0
        self._tolerance = 0.0
        self._set_rates(capacity, refill_per_s)
        self._level = self._capacity
        self._last = now

    @property
    def capacity(self) -> float:
        return self._capacity

    @property
    def refill_per_s(self) -> float:
        return self._rate

    def _set_rates(self, capacity: float, refill_per_s: float) -> None:
        if not (0 < capacity < math.inf):
            raise ValueError(f"capacity must be positive and finite, got {capacity!r}")
        if not (0 <= refill_per_s < math.inf):
            raise ValueError(f"refill_per_s must be finite and >= 0, got {refill_per_s!r}")
        self._capacity = float(capacity)
        self._rate = float(refill_per_s)
        self._tolerance = 1e-9 * max(1.0, self._capacity)

    def _refill(self, now: float) -> None:
        elapsed = now - self._last
        if elapsed > 0:
            self._level = min(self._capacity, self._level + elapsed * self._rate)
            self._last = now

    def level(self, now: float) -> float:
        """Tokens available at ``now`` (negative while in debt)."""
        self._refill(now)
        return self._level

    def try_take(self, amount: float, now: float) -> bool:
        """Take ``amount`` tokens if they are available at ``now``; report whether it did."""
        _check_amount(amount)
        self._refill(now)
        if amount > self._capacity or self._level + self._tolerance < amount:
            return False
        self._level -= amount
        return True

    def delay_until(self, amount: float, now: float) -> float:
        """Seconds from ``now`` until ``amount`` tokens will be available.

        0.0 if they are available now; ``math.inf`` if they never will be (``amount`` is
        more than the capacity, or the bucket does not refill).
        """
        _check_amount(amount)
        self._refill(now)
        if amount > self._capacity:
            return math.inf
        if self._level + self._tolerance >= amount:
            return 0.0
        if self._rate == 0:
            return math.inf
        return (amount - self._level) / self._rate

    def give_back(self, amount: float, now: float) -> None:
        """Refund ``amount`` tokens (a reservation that was not used); never above capacity."""
        _check_amount(amount)
        self._refill(now)
        self._level = min(self._capacity, self._level + amount)

    def take_debt(self, amount: float, now: float) -> None:
        """Take ``amount`` tokens unconditionally; the level may go negative."""
        _check_amount(amount)
        self._refill(now)
        self._level -= amount

    def reconfigure(self, capacity: float, refill_per_s: float, now: float) -> None:
        """Change capacity and rate at ``now`` (an admin edited the limit).

        Tokens already accrued are kept, clipped to the new capacity; debt is kept.
        """
        self._refill(now)
        self._set_rates(capacity, refill_per_s)
        self._level = min(self._capacity, self._level)


class WindowLimits:
    """Requests-per-minute and tokens-per-minute limits as two buckets.

    ``rpm``: capacity ``rpm`` requests refilled at ``rpm / 60`` per second; ``tpm`` likewise
    for tokens. ``None`` means unlimited. A request reserves one request and its estimated
    tokens with :meth:`try_acquire`; when it ends, :meth:`settle` corrects the token
    reservation to the real usage, or :meth:`cancel` refunds both if it never reached the
    upstream. A single request estimated at more than ``tpm`` tokens can never be admitted
    (:meth:`delay_until` returns ``math.inf``); the caller should reject it outright.
    """

    __slots__ = ("requests", "tokens")

    def __init__(self, rpm: int | None, tpm: int | None, now: float) -> None:
        self.requests: TokenBucket | None = None if rpm is None else _per_minute(rpm, now)
        self.tokens: TokenBucket | None = None if tpm is None else _per_minute(tpm, now)

    def delay_until(self, tokens: float, now: float) -> float:
        """Seconds until one request with ``tokens`` tokens would be admitted."""
        delay = 0.0
        if self.requests is not None:
            delay = self.requests.delay_until(1, now)
        if self.tokens is not None:
            delay = max(delay, self.tokens.delay_until(tokens, now))
        return delay

    def try_acquire(self, tokens: float, now: float) -> bool:
        """Reserve one request and ``tokens`` tokens, both or neither."""
        if self.delay_until(tokens, now) > 0:
            return False
        if self.requests is not None:
            taken = self.requests.try_take(1, now)
            assert taken, "delay_until said the request was available"
        if self.tokens is not None:
            taken = self.tokens.try_take(tokens, now)
            assert taken, "delay_until said the tokens were available"
        return True

    def settle(self, reserved_tokens: float, actual_tokens: float, now: float) -> None:
        """Replace a reservation of ``reserved_tokens`` by the ``actual_tokens`` used."""
        if self.tokens is None:
            return
        if actual_tokens <= reserved_tokens:
            self.tokens.give_back(reserved_tokens - actual_tokens, now)
        else:
            self.tokens.take_debt(actual_tokens - reserved_tokens, now)

    def cancel(self, reserved_tokens: float, now: float) -> None:
        """Refund a whole reservation: the request never reached the upstream."""
        if self.requests is not None:
            self.requests.give_back(1, now)
        if self.tokens is not None:
            self.tokens.give_back(reserved_tokens, now)


def _per_minute(limit: int, now: float) -> TokenBucket:
    if limit <= 0:
        raise ValueError(f"a per-minute limit must be positive (None = unlimited), got {limit}")
    return TokenBucket(limit, limit / 60.0, now)
