"""Accounts in memory: API-key authentication and quota, off the database's hot path.

Owns the cache of ``sk-`` key hashes, the per-user quota state (limit, used, in-flight
reservations, plan expiry, allowed model groups, per-user rpm bucket) and the checks made
before dispatch. Usage is charged here at once, in memory, and handed to the batcher for
Postgres separately. A key revoked through the API is dropped from the cache at once, so
it fails on the very next request.

Quota is spent from a *lease* (``store.quota``): this process may spend only tokens the
database granted it, so several processes on one database never spend more than a user
has in total. Leases are topped up when a request needs more than is left (a database
round trip only then), and unused leases of idle users are given back by ``run``.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from store.apikeys import ApiKeyOwner, find_api_key, hash_key
from store.db import Database
from store.errors import StoreError
from store.plans import get_plan
from store.quota import LEASE_TTL, acquire_lease, return_lease
from store.users import User, get_user
from workers.bucket import TokenBucket
from workers.errors import (
    AccountDisabled,
    AuthenticationFailed,
    PermissionDenied,
    PlanExpired,
    QuotaExceeded,
    RateLimited,
    Unavailable,
)
from workers.singleflight import SingleFlight

_NEGATIVE_TTL_S = 5.0
_NEGATIVE_MAX = 10_000
# After a top-up the database could not fill (the user is at their limit), requests are
# answered from memory for this long before the database is asked again: a user hammering
# past their quota costs no database round trip per request. A reload (payment, coupon,
# admin edit) ends the wait at once.
_DRY_RETRY_S = 1.0


@dataclass(slots=True)
class Account:
    user_id: str
    status: str
    plan: str | None
    token_limit: int
    token_used: int
    expires_at: float | None  # epoch seconds
    allowed_groups: frozenset[str] | None  # None: every group
    rpm: TokenBucket | None
    reserved: int = 0
    lease_left: int = 0  # tokens this process may still spend
    lease_at: float = -math.inf  # trio time of the last grant (renewal)
    dry_until: float = -math.inf  # trio time before which a short lease is not topped up
    active_at: float = -math.inf  # trio time of the last request
    topping_up: trio.Lock = field(default_factory=trio.Lock)

    @property
    def remaining(self) -> int:
        """Tokens this process may still grant to new requests."""
        return self.lease_left - self.reserved


class Accounts:
    """Authentication and quota for the /v1 routes."""

    def __init__(self, db: Database, holder: str, *, lease_cap: int = 1_000_000,
                 idle_return_s: float = 5.0) -> None:
        self._db = db
        self.holder = holder
        self._lease_cap = lease_cap
        self._idle_return_s = idle_return_s
        self._keys: dict[bytes, ApiKeyOwner] = {}
        self._misses: OrderedDict[bytes, float] = OrderedDict()
        self._users: dict[str, Account] = {}
        # A burst of first requests (a restart under load) reads each key and user once.
        self._key_reads: SingleFlight[bytes, ApiKeyOwner | None] = SingleFlight()
        self._user_reads: SingleFlight[str, Account | None] = SingleFlight()

    async def authenticate(self, secret: str) -> tuple[ApiKeyOwner, Account]:
        if not secret.startswith("sk-") or len(secret) > 200:
            raise AuthenticationFailed("Incorrect API key provided.")
        digest = hash_key(secret)
        owner = self._keys.get(digest)
        if owner is None:
            owner = await self._lookup(digest)
        return owner, await self.account(owner.user_id)

    async def _lookup(self, digest: bytes) -> ApiKeyOwner:
        now = time.monotonic()
        miss = self._misses.get(digest)
        if miss is not None and miss > now:
            raise AuthenticationFailed("Incorrect API key provided.")
        owner = await self._key_reads.run(digest, lambda: find_api_key(self._db, digest))
        if owner is None:
            self._misses[digest] = now + _NEGATIVE_TTL_S
            while len(self._misses) > _NEGATIVE_MAX:
                self._misses.popitem(last=False)
            raise AuthenticationFailed("Incorrect API key provided.")
        self._keys[digest] = owner
        return owner

    def forget_key(self, digest: bytes) -> None:
        """A key was revoked (or created): drop any cached answer for it."""
        self._keys.pop(digest, None)
        self._misses.pop(digest, None)

    async def reload_all(self) -> None:
        """Forget every cached key and re-read every cached user (after missed events)."""
        self._keys.clear()
        self._misses.clear()
        for user_id in list(self._users):
            await self.reload(user_id)

    async def account(self, user_id: str) -> Account:
        account = self._users.get(user_id)
        if account is None:
            account = await self._load(user_id)
        return account

    async def reload(self, user_id: str) -> None:
        """Re-read a user's limits after an admin, payment or coupon change.

        The cached ``Account`` is updated in place: requests in flight hold it and settle
        their reservation and usage on it when they end (a replacement object would keep
        their reservations forever and slowly starve the user). The in-memory
        ``token_used`` is kept when larger (it includes usage not yet flushed).
        """
        account = self._users.get(user_id)
        if account is None:
            return
        user = await get_user(self._db, user_id)
        if user is None:
            self._users.pop(user_id, None)
            return
        fresh = await self._account_from(user)
        account.status, account.plan = fresh.status, fresh.plan
        account.token_limit = fresh.token_limit
        account.token_used = max(fresh.token_used, account.token_used)
        account.expires_at, account.allowed_groups = fresh.expires_at, fresh.allowed_groups
        account.dry_until = -math.inf
        if account.rpm is None or fresh.rpm is None \
                or account.rpm.capacity != fresh.rpm.capacity:
            account.rpm = fresh.rpm  # a changed limit starts a fresh bucket
        # The limit may have been lowered: give the unspent lease back, so the next
        # request is granted against the new limit. Requests in flight may take
        # ``lease_left`` below zero when they settle; the next request tops it up.
        if account.lease_left > 0:
            amount, account.lease_left = account.lease_left, 0
            try:
                await return_lease(self._db, user_id, self.holder, amount)
            except StoreError:
                account.lease_left += amount

    async def _load(self, user_id: str) -> Account:
        """Read an uncached user. Many first requests may load the same user at once: one
        read serves them all and its ``Account`` is the one cached, so there is exactly
        one ``Account`` (one lease, one set of reservations) per user in this process."""
        account = await self._user_reads.run(user_id, lambda: self._read_account(user_id))
        if account is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return self._users.setdefault(user_id, account)

    async def _read_account(self, user_id: str) -> Account | None:
        user = await get_user(self._db, user_id)
        return None if user is None else await self._account_from(user)

    async def _account_from(self, user: User) -> Account:
        groups: frozenset[str] | None = None
        if user.plan:
            plan = await get_plan(self._db, user.plan)
            if plan is not None and plan.model_groups:
                groups = frozenset(plan.model_groups)
        rpm = TokenBucket(user.rpm, user.rpm / 60.0, trio.current_time()) if user.rpm else None
        return Account(
            user_id=user.id,
            status=user.status,
            plan=user.plan,
            token_limit=user.token_limit,
            token_used=user.token_used,
            expires_at=user.expires_at.timestamp() if user.expires_at else None,
            allowed_groups=groups,
            rpm=rpm,
        )

    def used_tokens(self, user_id: str, stored: int) -> int:
        """Tokens used, counting what is charged in memory but not yet flushed."""
        account = self._users.get(user_id)
        return stored if account is None else max(stored, account.token_used)

    async def check(self, account: Account, model_group: str, reserve: int, need: int) -> int:
        """Admit one request or raise; reserve ``reserve`` tokens; return the token budget
        (what the request may use in all). ``need`` is what it may use at most (prompt
        plus its output limit): the lease is topped up towards it when short."""
        if account.status != "active":
            raise AccountDisabled("This account is disabled.")
        if account.expires_at is not None and account.expires_at <= time.time():
            raise PlanExpired("Your plan has expired. Renew it to continue.")
        if account.allowed_groups is not None and model_group not in account.allowed_groups:
            raise PermissionDenied("Your plan does not include this model.")
        now = trio.current_time()
        if self._short(account, need, now):
            async with account.topping_up:  # one grant request per user at a time
                if self._short(account, need, trio.current_time()):
                    await self._top_up(account, need - max(account.remaining, 0))
        if account.remaining <= reserve:  # not even the prompt, plus one token, fits
            raise QuotaExceeded(
                "You exceeded your current quota, please check your plan and billing details."
            )
        if account.rpm is not None and not account.rpm.try_take(1, now):
            raise RateLimited(
                "Rate limit reached for requests per minute.",
                retry_after_s=account.rpm.delay_until(1, now),
            )
        budget = account.remaining
        account.reserved += reserve
        account.active_at = now
        return budget

    @staticmethod
    def _short(account: Account, need: int, now: float) -> bool:
        if now - account.lease_at > LEASE_TTL.total_seconds() / 2:
            return True  # renew a lease before it lapses
        return account.remaining < need and now >= account.dry_until

    async def _top_up(self, account: Account, want: int) -> None:
        try:
            grant, reset = await acquire_lease(self._db, account.user_id, self.holder,
                                               max(want, 1), self._lease_cap)
        except StoreError as exc:
            if account.remaining > 0:
                return  # keep serving from what is left; try again on the next request
            raise Unavailable("Quota could not be checked; retry shortly.",
                              retry_after_s=1.0) from exc
        account.lease_left = grant if reset else account.lease_left + grant
        account.lease_at = trio.current_time()
        if grant < want:  # the database has no more for this user: stop asking a while
            account.dry_until = account.lease_at + _DRY_RETRY_S

    def settle(self, account: Account, reserved: int, used: int) -> None:
        """Release the reservation and charge the real usage, at once, in memory."""
        account.reserved -= reserved
        account.lease_left -= used
        account.token_used += used

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Give back the unspent leases of idle users, so other processes can use them."""
        task_status.started()
        while True:
            await trio.sleep(self._idle_return_s)
            now = trio.current_time()
            for account in list(self._users.values()):
                if account.reserved == 0 and account.lease_left > 0 and \
                        now - account.active_at >= self._idle_return_s:
                    amount = account.lease_left
                    account.lease_left = 0
                    try:
                        await return_lease(self._db, account.user_id, self.holder, amount)
                    except StoreError:
                        account.lease_left += amount  # try again next round
