"""The dispatcher: one request's path through the key pool, and its bill.

Owns failover (bounded attempts, only before the first byte reaches the client), the
mapping of the last failure to the client's error, and billing: when a request ends, for
whatever reason, its usage (upstream's when it sent one, else our estimate) is charged to
the account in memory at once and handed to the usage batcher exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import trio

from observability.metrics import Metrics
from store.apikeys import ApiKeyOwner
from store.usage import UsageRecord
from workers.accounts import Account, Accounts
from workers.catalog import Catalog
from workers.errors import (
    GatewayError,
    ModelNotFound,
    NoCapacity,
    Overloaded,
    RateLimited,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from workers.failure import LOCAL_RESOURCES, FailureClass
from workers.job import Event, Failed, Job, Opener, Started
from workers.overload import Admission
from workers.pool import KeyPool
from workers.pricing import Prices, cost_micro
from workers.tokens import Usage

_REPLY_BUFFER = 8
_FREE = Prices(0, 0, 0)
log = logging.getLogger("airgate.dispatch")


@dataclass(slots=True)
class Request:
    """A validated /v1 request, ready to dispatch."""

    request_id: str
    endpoint: str  # chat | completions | embeddings
    upstream_path: str
    body: dict[str, Any]
    raw_body: bytes
    model: str
    stream: bool
    include_usage: bool
    prompt_estimate: int
    max_output: int
    owner: ApiKeyOwner
    account: Account
    started_at: float = field(default_factory=trio.current_time)
    opener: Opener | None = None  # starts a stream's response (see ``workers.job``)


@dataclass(slots=True)
class Reply:
    """An upstream answer being relayed; iterate it for body bytes."""

    request: Request
    started: Started
    job: Job
    _receive: trio.MemoryReceiveChannel[Event]

    async def chunks(self) -> AsyncIterator[bytes]:
        while (event := await self._next()) is not None:
            if isinstance(event, bytes):
                yield event

    async def _next(self) -> Event | None:
        """The next event, or None at the end. An event already queued (a whole body
        usually is, with the end, when the request task learns of the start) is taken
        without a pass through the scheduler: ``receive`` always makes one."""
        try:
            return self._receive.receive_nowait()
        except trio.WouldBlock:
            pass
        except trio.EndOfChannel:
            return None
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            return None

    def take_queued(self) -> tuple[bytes, bool]:
        """Every body byte already queued, joined (chunks that arrived together leave
        together), and whether the reply has ended. Never waits."""
        parts: list[bytes] = []
        while True:
            try:
                event = self._receive.receive_nowait()
            except trio.WouldBlock:
                return b"".join(parts), False
            except trio.EndOfChannel:
                return b"".join(parts), True
            if isinstance(event, bytes):
                parts.append(event)

    async def next_chunk(self) -> bytes | None:
        """The next body bytes, or None at the end."""
        while (event := await self._next()) is not None:
            if isinstance(event, bytes):
                return event
        return None


class Dispatcher:
    def __init__(
        self,
        pool: KeyPool,
        accounts: Accounts,
        catalog: Catalog,
        usage: trio.MemorySendChannel[UsageRecord],
        metrics: Metrics,
        *,
        max_attempts: int,
        dispatch_wait_s: float,
        admission: Admission | None = None,
    ) -> None:
        self._pool = pool
        self._accounts = accounts
        self._catalog = catalog
        self._usage = usage
        self._metrics = metrics
        self._max_attempts = max_attempts
        self._dispatch_wait_s = dispatch_wait_s
        # Knows how long a refused client should wait (off by default: the shortest wait).
        self._admission = admission if admission is not None else Admission(0.0)

    async def admit(self, model_id: str, account: Account, reserve: int, need: int) -> int:
        """Check the model and the account; reserve tokens; return the token budget."""
        model = self._catalog.get(model_id)
        if model is None or not self._pool.serving(model_id):
            raise ModelNotFound(
                f"The model `{model_id}` does not exist or you do not have access to it.",
                param="model",
            )
        return await self._accounts.check(account, model.model_group, reserve, need)

    async def open(self, req: Request, token_budget: int) -> Reply:
        """Send the request to keys until one answers; raise the last failure otherwise."""
        tried: set[str] = set()
        deadline = trio.current_time() + self._dispatch_wait_s
        last: Failed | None = None
        tokens = req.prompt_estimate + req.max_output
        for _ in range(self._max_attempts):
            actor = self._pool.pick(req.model, tokens, tried) or \
                self._pool.fallback(req.model, tried)
            if actor is None:
                break
            send, receive = trio.open_memory_channel[Event](_REPLY_BUFFER)
            job = Job(
                request_id=req.request_id, endpoint=req.endpoint,
                upstream_path=req.upstream_path, body=req.body, raw_body=req.raw_body,
                public_model=req.model,
                stream=req.stream, include_usage=req.include_usage,
                prompt_estimate=req.prompt_estimate, max_output=req.max_output,
                token_budget=token_budget, deadline=deadline, reply=send,
                opener=req.opener,
            )
            if not actor.submit_nowait(job):
                try:
                    with trio.move_on_at(deadline) as waiting:
                        await actor.submit(job)
                except trio.ClosedResourceError:  # the key was removed meanwhile
                    tried.add(actor.key.id)
                    continue
                if waiting.cancelled_caught:
                    raise self.overloaded()
            try:
                first = await receive.receive()
            except trio.EndOfChannel:
                tried.add(actor.key.id)
                continue
            except BaseException:
                job.abort()
                raise
            if isinstance(first, Started):
                return Reply(req, first, job, receive)
            assert isinstance(first, Failed)
            receive.close()
            tried.add(actor.key.id)
            last = first
            if not first.failure.failover:
                break
        raise self._failure_error(req.model, last)

    def _failure_error(self, model: str, last: Failed | None) -> GatewayError:
        retry_after = self._pool.retry_after(model, trio.current_time())
        if last is None:
            self._metrics.shed.labels("no_capacity").inc()
            return NoCapacity(
                "No upstream key can take this request right now; retry shortly.",
                retry_after_s=retry_after or 1.0,
            )
        kind = last.failure.kind
        if last.failure.upstream_code == LOCAL_RESOURCES:
            return Unavailable("The gateway is out of connections; retry shortly.",
                               retry_after_s=1.0)
        if kind == FailureClass.TIMEOUT:
            return UpstreamTimeout("The upstream did not answer in time.", retry_after_s=1.0)
        if kind == FailureClass.RATE_LIMITED:
            self._metrics.shed.labels("rate_limited").inc()
            return RateLimited(
                "Every upstream key for this model is rate limited; retry shortly.",
                retry_after_s=last.failure.retry_after_s or retry_after or 1.0,
            )
        return UpstreamError(
            f"The upstream failed: {last.message}.", retry_after_s=retry_after or 1.0
        )

    async def close(self) -> None:
        """No more requests: let the batcher drain once every producer has closed."""
        await self._usage.aclose()

    def overloaded(self) -> Overloaded:
        """The refusal for a request the gateway has no room for, with the wait the
        admission control estimates (``workers.overload``), jittered."""
        self._metrics.shed.labels("overloaded").inc()
        return Overloaded("The gateway is overloaded; retry shortly.",
                          retry_after_s=self._admission.retry_after_s())

    async def finish(self, req: Request, reserved: int, reply: Reply | None, status: int) -> None:
        """Bill the request exactly once. Call shielded, whatever happened."""
        job = reply.job if reply is not None else None
        if job is not None:
            job.abort()  # a no-op when the stream already ended
        usage, source = _usage_of(req, job)
        self._accounts.settle(req.account, reserved, usage.total)
        prices = self._catalog.prices.get(req.model, _FREE)
        cost = cost_micro(prices, usage.prompt_tokens, usage.cached_tokens,
                          usage.completion_tokens)
        now = trio.current_time()
        ttft = None
        if job is not None and job.first_byte_at is not None:
            ttft = int((job.first_byte_at - req.started_at) * 1000)
        record = UsageRecord(
            request_id=req.request_id, user_id=req.owner.user_id,
            api_key_id=req.owner.api_key_id,
            upstream_key_id=job.upstream_key_id if job is not None else None,
            model=req.model, endpoint=req.endpoint,
            prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens, cost_micro=cost,
            latency_ms=int((now - req.started_at) * 1000), ttft_ms=ttft,
            status=status, usage_source=source,
            created_at=datetime.now(UTC) - timedelta(seconds=now - req.started_at),
        )
        _, ttft_h, upstream_h, overhead_h = self._metrics.by_route(req.endpoint)
        if ttft is not None:
            ttft_h.observe(ttft / 1000)
        if job is not None and job.upstream_started_at is not None:
            upstream = (job.upstream_ended_at or now) - job.upstream_started_at
            upstream_h.observe(upstream)
            overhead_h.observe(max(now - req.started_at - upstream, 0.0))
        if usage.total:
            prompt_c, cached_c, completion_c, cost_c = self._metrics.by_model(req.model)
            prompt_c.inc(usage.prompt_tokens)
            cached_c.inc(usage.cached_tokens)
            completion_c.inc(usage.completion_tokens)
            cost_c.inc(cost)
        try:
            try:
                self._usage.send_nowait(record)
            except trio.WouldBlock:
                await self._usage.send(record)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # Only when the gateway was cancelled outright instead of shut down gracefully.
            log.error("usage record %s lost: the batcher has stopped", req.request_id)


def _usage_of(req: Request, job: Job | None) -> tuple[Usage, str]:
    if job is None or job.upstream_started_at is None:
        return Usage(prompt_tokens=0, cached_tokens=0, completion_tokens=0), "none"
    if (usage := job.known_usage) is not None:
        return usage, "upstream"
    if job.status >= 400:
        return Usage(prompt_tokens=0, cached_tokens=0, completion_tokens=0), "none"
    completion = job.counter.completion_tokens_estimate or job.whole_completion_estimate
    return Usage(
        prompt_tokens=req.prompt_estimate, cached_tokens=0, completion_tokens=completion
    ), "estimate"
