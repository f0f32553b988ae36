"""The per-upstream-key actor.

Owns one upstream key's limits (rpm and tpm token buckets, ``max_concurrency`` worker
tasks) and its health. Jobs arrive through a bounded inbox; each worker task admits a
job against the buckets and the health state, calls the upstream, relays the body bytes
to the job's reply channel while counting tokens, settles the tpm reservation with the
real usage, and feeds the outcome to the health state machine. Only this actor's tasks
change its state; the router only reads it (``can_take``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable

import orjson
import trio

from observability.metrics import Metrics
from store.upstream_keys import UpstreamKey
from workers.bucket import WindowLimits
from workers.failure import Failure, FailureClass, classify, parse_retry_after
from workers.health import HealthState, KeyHealth
from workers.job import Failed, Job, Started, put
from workers.pump import ReadPump
from workers.relay import relay_body
from workers.upstream import TransportFailure, UpstreamClient, UpstreamResponse

log = logging.getLogger("airgate.keyactor")

OnDisable = Callable[[str, str], Awaitable[None]]

_MAX_ERROR_BODY = 64 * 1024


class KeyActor:
    """Serves jobs for one upstream key within its limits."""

    def __init__(
        self,
        key: UpstreamKey,
        client: UpstreamClient,
        metrics: Metrics,
        *,
        inbox_size: int,
        first_byte_timeout_s: float,
        idle_timeout_s: float,
        on_disable: OnDisable,
        share: tuple[int, int] = (0, 1),
        pump: ReadPump | None = None,
    ) -> None:
        self.key = key
        self._pump = pump
        self._client = client
        self._metrics = metrics
        self._first_byte_timeout_s = first_byte_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._on_disable = on_disable
        now = trio.current_time()
        self.health = KeyHealth(now)
        if key.status != "active":
            self.health.disable(key.disabled_reason or "disabled")
        # With several worker processes each owns its share of the key's limits, so the
        # limits hold in total. A share of 0 means this process cannot use the key.
        rpm = _share(key.rpm, share)
        tpm = _share(key.tpm, share)
        self.concurrency = _share(key.max_concurrency, share) or 0
        self.usable = rpm != 0 and tpm != 0 and self.concurrency > 0
        self.limits = WindowLimits(rpm or None, tpm or None, now)
        self.rpm = self.limits.requests  # read by the router and the metrics
        self.tpm = self.limits.tokens
        self.inbox_size = inbox_size
        self._send, self._receive = trio.open_memory_channel[Job](inbox_size)
        self.queued = 0
        self.inflight = 0
        self._url_base = key.base_url.rstrip("/")
        self._nursery: trio.Nursery | None = None

    # -- read by the router --------------------------------------------------------------

    def serves(self, model: str) -> bool:
        return self.usable and model in self.key.models

    def can_take(self, now: float, tokens: int) -> bool:
        """Whether a job of ``tokens`` estimated tokens would be admitted right away."""
        if not self.usable or not self.has_room() or not self.health.available(now):
            return False
        if self.queued + self.inflight >= self.concurrency:
            return False
        if self.rpm is not None and self.rpm.level(now) < 1:
            return False
        return self.tpm is None or self.tpm.level(now) >= min(tokens, self.tpm.capacity)

    def has_room(self) -> bool:
        """Whether the inbox's buffer has room. Jobs handed straight to an idle worker that
        has not run yet are counted in ``queued`` but take no room: a burst of requests
        arriving in one scheduler pass must not look like a full inbox."""
        return self._send.statistics().current_buffer_used < self.inbox_size

    def retry_after(self, now: float) -> float | None:
        """Seconds until this key may take work again (None: not known / disabled)."""
        if self.health.state(now) == HealthState.DISABLED:
            return None
        waits = [self.health.retry_after(now) or 0.0]
        if self.rpm is not None:
            waits.append(self.rpm.delay_until(1, now))
        return max(waits)

    # -- fed by the dispatcher -----------------------------------------------------------

    def submit_nowait(self, job: Job) -> bool:
        try:
            self._send.send_nowait(job)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        self.queued += 1
        return True

    async def submit(self, job: Job) -> None:
        await self._send.send(job)
        self.queued += 1

    # -- the actor ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run ``max_concurrency`` workers until ``close`` is called and the inbox drains."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            async with self._receive:
                for _ in range(self.concurrency):
                    nursery.start_soon(self._worker, self._receive.clone())
            task_status.started()

    def close(self) -> None:
        """Stop taking jobs; queued ones are still answered, then the workers exit."""
        self._send.close()

    async def _worker(self, inbox: trio.MemoryReceiveChannel[Job]) -> None:
        async with inbox:
            async for job in inbox:
                self.queued -= 1
                try:
                    await self._serve(job)
                except Exception:
                    # A bug serving one request must not take the key (or the gateway) down;
                    # the job's reply channel is closed, so its client gets an error.
                    log.exception("unexpected error serving a request on key %s", self.key.id)
                # An idle worker must not hold its last job (the request's body, its reply
                # channel, the client's connection state) until the next one comes: with
                # thousands of workers that pinned thousands of finished requests.
                del job

    async def _serve(self, job: Job) -> None:
        async with job.reply:
            if job.aborted:
                return
            now = trio.current_time()
            if not self.health.available(now):
                await self._refuse(job, FailureClass.TRANSIENT, "key is not available")
                return
            reserved = self._reservation(job)
            admitted = False
            with trio.CancelScope() as waiting:
                job.attach(waiting)  # abort() must also end a wait for the buckets
                admitted = await self._admit(job, reserved)
            if job.aborted:  # nothing was taken: the buckets are taken without a checkpoint
                return
            if not admitted:
                await self._refuse(job, FailureClass.RATE_LIMITED, "key rate limit reached")
                return
            now = trio.current_time()
            if not self.health.available(now):  # another request's result arrived meanwhile
                self.limits.cancel(reserved, now)
                await self._refuse(job, FailureClass.TRANSIENT, "key is not available")
                return
            self.health.begin(now)
            self.inflight += 1
            failure: Failure | None = None
            verdict = False
            try:
                with trio.CancelScope() as scope:
                    job.attach(scope)
                    failure = await self._execute(job)
                verdict = True
            finally:
                self.inflight -= 1
                self._settle(job, reserved)
                if not verdict:  # a bug, or the gateway stopping: no word on the key,
                    self.health.abandon(trio.current_time())  # and a probe slot freed
            self._record(job, failure)

    def _reservation(self, job: Job) -> int:
        """Tokens held against tpm while the job runs; never more than the bucket holds
        (a job bigger than the whole tpm would otherwise wait forever)."""
        tokens = job.prompt_estimate + job.max_output
        return tokens if self.tpm is None else min(tokens, int(self.tpm.capacity))

    async def _admit(self, job: Job, reserved: int) -> bool:
        """Take one request from rpm and the reservation from tpm, waiting a little."""
        while True:
            now = trio.current_time()
            if self.limits.try_acquire(reserved, now):
                return True
            wait = self.limits.delay_until(reserved, now)
            if math.isinf(wait) or now + wait > job.deadline or job.aborted:
                return False
            await trio.sleep(wait)

    def _settle(self, job: Job, reserved: int) -> None:
        """Replace the tpm reservation by the real usage (refund, or debt on overrun)."""
        if (usage := job.known_usage) is not None:
            used = usage.total
        else:
            used = job.prompt_estimate + (job.counter.completion_tokens_estimate
                                          or job.whole_completion_estimate)
        self.limits.settle(reserved, used, trio.current_time())

    async def _refuse(self, job: Job, kind: FailureClass, message: str) -> None:
        failure = Failure(kind=kind, retry_after_s=self.retry_after(trio.current_time()),
                          upstream_type=None, upstream_code=None, failover=True,
                          affects_health=False)
        await self._fail(job, failure, message)

    def _payload(self, job: Job) -> bytes:
        """The request for this key: the client's own bytes when nothing needs changing
        (the usual case), else re-encoded with the mapped model and usage asked for."""
        upstream_model = self.key.model_map.get(job.public_model, job.public_model)
        wants_usage = job.stream and job.endpoint != "embeddings" and not job.include_usage
        # A user close to the end of their quota may ask for no more than they have left.
        capped = job.endpoint != "embeddings" and job.token_budget is not None \
            and job.token_budget < job.max_output
        if upstream_model == job.public_model and not wants_usage and not capped \
                and job.raw_body:
            return job.raw_body
        body = dict(job.body)
        body["model"] = upstream_model
        if capped:
            limit = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
            body[limit] = max(job.token_budget or 0, 1)
        if wants_usage:
            options = dict(body.get("stream_options") or {})
            options["include_usage"] = True
            body["stream_options"] = options
        return orjson.dumps(body)

    async def _execute(self, job: Job) -> Failure | None:
        """Call the upstream and relay; return the failure that counts against the key."""
        payload = self._payload(job)
        url = self._url_base + job.upstream_path
        job.upstream_key_id = self.key.id
        job.upstream_started_at = trio.current_time()
        try:
            with trio.move_on_after(self._first_byte_timeout_s) as first_byte:
                async with self._client.post(url, self.key.api_key, payload) as response:
                    first_byte.deadline = math.inf
                    job.status = response.status
                    if response.status >= 400:
                        return await self._upstream_error(job, response)
                    started = Started(
                        response.status,
                        response.headers.get("content-type", "application/json"),
                        self.key.id,
                    )
                    if job.stream and job.opener is not None and not job.aborted:
                        # Committed: a stream that has started is not failed over. (An
                        # aborted job's client side is gone or going: no head for it.)
                        job.sink = await job.opener(started)
                    await put(job.reply, started)
                    return await relay_body(job, response, self._idle_timeout_s,
                                            self._first_byte_timeout_s, self._pump)
            failure = classify(None, None, timeout=True)
            await self._fail(job, failure, "upstream did not answer in time")
            return failure
        except TransportFailure as exc:
            await self._fail(job, exc.failure, f"upstream connection failed ({exc})")
            return exc.failure
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None  # the dispatcher stopped listening: nothing to blame the key for
        finally:
            job.upstream_ended_at = trio.current_time()

    async def _upstream_error(self, job: Job, response: UpstreamResponse) -> Failure:
        status = response.status
        body = await response.read(_MAX_ERROR_BODY)
        failure = classify(status, body)
        header = parse_retry_after(response.headers.get("retry-after"), time.time())
        if header is not None:
            failure = dataclasses.replace(failure, retry_after_s=header)
        if failure.failover:
            await self._fail(job, failure, f"upstream answered {status}")
        else:
            # The caller's own fault: the upstream's answer is the right one to show.
            await job.reply.send(Started(status, "application/json", self.key.id))
            await job.reply.send(body)
        return failure

    async def _fail(self, job: Job, failure: Failure, message: str) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await job.reply.send(Failed(failure, message, self.key.id))

    def _record(self, job: Job, failure: Failure | None) -> None:
        now = trio.current_time()
        if failure is None:
            if job.status and job.status < 400:
                self.health.record_success(now)
            elif job.aborted:
                self.health.abandon(now)  # no answer yet when the client left: no verdict
            return
        self._metrics.upstream_failures.labels(failure.kind.value).inc()
        if not failure.affects_health:
            return
        self.health.record_failure(failure.kind, now, failure.retry_after_s)
        if self.health.state(now) == HealthState.DISABLED and self._nursery is not None:
            reason = f"auto-disabled: {failure.kind.value}"
            log.warning("upstream key %s disabled (%s)", self.key.id, failure.kind.value)
            self._nursery.start_soon(self._on_disable, self.key.id, reason)


def _share(limit: int | None, share: tuple[int, int]) -> int | None:
    """Worker ``index`` of ``count``'s part of ``limit``; the parts add up to ``limit``."""
    if limit is None:
        return None
    index, count = share
    return limit // count + (1 if index < limit % count else 0)
