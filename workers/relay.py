"""Relaying an upstream body to the client while counting tokens.

Owns the per-chunk hot loop: raw upstream bytes are split into SSE events, each event's
data is fed to the job's token counter, and the events' original bytes are forwarded
unchanged (never re-encoded), to the job's sink once the client's side handed one over,
else to its reply channel. Events that arrived together leave together. The only
event dropped is the usage-only chunk the gateway asked for on the client's behalf when
the client did not ask for it. Ends a failed stream with an OpenAI-shaped error event.
"""

from __future__ import annotations

import logging
import math

import orjson
import trio

from workers.failure import Failure, FailureClass, classify
from workers.job import Job, Sink, put
from workers.pump import ReadPump
from workers.sse import SSEEventTooLarge, SSESplitter
from workers.tokens import MalformedChunk, estimate_completion_tokens, usage_from_response
from workers.upstream import DirectBody, TransportFailure, UpstreamResponse

log = logging.getLogger("airgate.relay")


def error_event(message: str, type_: str, code: str | None) -> bytes:
    """A ``data:`` event carrying an OpenAI error object, as OpenAI sends mid-stream."""
    payload = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def relay_body(
    job: Job, response: UpstreamResponse, idle_timeout_s: float, first_byte_timeout_s: float,
    pump: ReadPump | None = None,
) -> Failure | None:
    """Forward the body; return the failure to record against the key, if any. A stream
    is read by ``pump`` when the pump runs, the body can be read without waiting (our
    own transport, plain or TLS) and the client's sink can write without waiting
    (HTTP/1.1 with direct writes)."""
    if not job.stream:
        return await _relay_whole(job, response, first_byte_timeout_s)
    return await _relay_stream(job, response, idle_timeout_s, first_byte_timeout_s, pump)


async def _relay_whole(
    job: Job, response: UpstreamResponse, timeout_s: float
) -> Failure | None:
    with trio.move_on_after(timeout_s):
        try:
            body = await response.read()
        except TransportFailure as exc:
            await job.reply.send(_error_json(exc.failure, "upstream connection broke"))
            return exc.failure
        job.first_byte_at = trio.current_time()
        try:
            parsed = orjson.loads(body)
            job.usage = usage_from_response(parsed)
            if job.usage is None and isinstance(parsed, dict):
                job.whole_completion_estimate = estimate_completion_tokens(parsed)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            job.usage = None
        await put(job.reply, body)
        return None
    failure = classify(None, None, timeout=True)
    await job.reply.send(_error_json(failure, "upstream timed out"))
    return failure


def _error_json(failure: Failure, message: str) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": "upstream_error", "param": None,
                   "code": failure.kind.value}}
    )


_IDLE_GRANULARITY_S = 1.0
_MALFORMED = Failure(kind=FailureClass.TRANSIENT, retry_after_s=None, upstream_type=None,
                     upstream_code="malformed_chunk", failover=False, affects_health=True)


async def _deliver(job: Job, data: bytes) -> None:
    """Hand bytes to the client: straight through its sink once it has handed one over
    (it took what was queued before, in the same step), else through the reply channel
    (which has room for a few chunks: no wait)."""
    sink = job.sink
    if sink is not None:
        await sink.send(data)
        return
    await put(job.reply, data)


class _Relay:
    """One stream's splitting and counting: what of the upstream's bytes to forward.
    Shared by the two ways of reading (the stream's own task, or ``workers.pump``)."""

    __slots__ = ("budget", "counter", "failure", "job", "splitter")

    def __init__(self, job: Job) -> None:
        self.job = job
        self.splitter = SSESplitter()
        self.counter = job.counter
        self.budget = job.token_budget if job.token_budget is not None else math.inf
        self.failure: Failure | None = None  # the upstream's in-stream error, forwarded

    @property
    def stopped(self) -> bool:
        """Nothing more is relayed: the upstream's error went through, or the quota."""
        return self.failure is not None or self.job.cut_for_quota

    def feed(self, data: bytes) -> bytes:
        """The events ``data`` completes that go to the client (``b""``: none). Raises
        ``MalformedChunk`` and ``SSEEventTooLarge``."""
        out: list[bytes] = []
        counter = self.counter
        for event in self.splitter.feed(data):
            if event.data is None:
                continue  # upstream comments and pings: we send our own
            info = counter.feed(event.data)
            if info.usage_only and not self.job.include_usage:
                continue
            out.append(event.raw)
            if info.error is not None:
                # The upstream reported an error in-stream: pass it on and stop.
                self.failure = classify(None, orjson.dumps({"error": info.error}))
                break
            if counter.completion_tokens_estimate > self.budget:
                self.job.cut_for_quota = True  # the rest of this batch is not relayed
                break
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)


async def _relay_stream(
    job: Job, response: UpstreamResponse, idle_timeout_s: float, first_byte_timeout_s: float,
    pump: ReadPump | None = None,
) -> Failure | None:
    relay = _Relay(job)
    failure: Failure | None = None
    sink = job.sink
    try:
        if pump is not None and pump.running and sink is not None and sink.writes_now \
                and (body := response.direct_body()) is not None:
            idle, sending = await _read_pumped(relay, body, sink, pump, idle_timeout_s,
                                               first_byte_timeout_s)
        else:
            idle, sending = await _read_own(relay, response, idle_timeout_s,
                                            first_byte_timeout_s)
    except TransportFailure as exc:
        failure = exc.failure
        idle = sending = False
    except (MalformedChunk, SSEEventTooLarge):
        failure = _MALFORMED
        idle = sending = False
    if idle:
        if sending:
            # The client read nothing for the whole idle timeout: end its stream, without
            # blaming the key (the error event would not reach it either).
            log.info("request %s: client stalled for %.0f s; stream ended",
                     job.request_id, idle_timeout_s)
            return None
        failure = classify(None, None, timeout=True)
    elif relay.failure is not None:
        return relay.failure  # the upstream's own error event went through
    elif job.cut_for_quota:
        await _deliver(job, error_event(
            "You exceeded your current quota; the stream was stopped.",
            "insufficient_quota", "insufficient_quota"))
    elif failure is None and not relay.counter.done:
        failure = classify(None, None, connect_error=True)  # cut off before [DONE]
    if failure is not None:
        await _deliver(job, error_event(
            f"The upstream stream failed ({failure.kind.value}).", "upstream_error",
            failure.upstream_code or failure.kind.value))
    return failure


async def _read_own(
    relay: _Relay, response: UpstreamResponse, idle_timeout_s: float,
    first_byte_timeout_s: float,
) -> tuple[bool, bool]:
    """Read and relay the body in this task until it ends or the relay stops; returns
    (timed out, while sending to the client)."""
    job = relay.job
    sending = False  # waiting on the client: a timeout now is the client's, not upstream's
    chunks = response.chunks()
    # The idle deadline moves at most once a second (moving a cancel scope's deadline is
    # not free, and this runs per upstream read): it fires between idle_timeout_s and
    # idle_timeout_s + 1 s after the upstream's last bytes.
    push_at = -math.inf
    with trio.CancelScope(deadline=trio.current_time() + first_byte_timeout_s) as idle:
        try:
            async for data in chunks:
                now = trio.current_time()
                if now >= push_at:
                    idle.deadline = now + idle_timeout_s + _IDLE_GRANULARITY_S
                    push_at = now + _IDLE_GRANULARITY_S
                out = relay.feed(data)
                if out:
                    if job.first_byte_at is None:
                        job.first_byte_at = now
                    sending = True
                    await _deliver(job, out)
                    sending = False
                if relay.stopped:
                    break
        finally:
            await chunks.aclose()
    return idle.cancelled_caught, sending


class _Pumped:
    """A stream read by ``workers.pump``: the handler the pump calls, and what it left
    for the stream's task (held bytes, the end, an error)."""

    __slots__ = ("armed", "body", "error", "held", "idle_s", "last", "pump", "relay", "sink",
                 "waiting", "wake")

    def __init__(self, relay: _Relay, body: DirectBody, sink: Sink, pump: ReadPump,
                 idle_s: float) -> None:
        self.relay = relay
        self.idle_s = idle_s
        self.body = body
        self.sink = sink
        self.pump = pump
        self.armed = False
        self.held = False  # the sink holds bytes the task must flush
        self.error: Exception | None = None
        self.last: float | None = None  # when the upstream last sent bytes
        self.wake = trio.Event()
        self.waiting: trio.CancelScope | None = None  # the task's wait for the wake

    @property
    def finished(self) -> bool:
        return self.error is not None or self.body.done or self.relay.stopped

    def arm(self) -> None:
        self.wake = trio.Event()
        self.pump.add(self.body.fd, self.on_readable)
        self.armed = True

    def disarm(self) -> None:
        if self.armed:
            self.armed = False
            self.pump.remove(self.body.fd)

    def on_readable(self) -> None:
        """Read what arrived, relay it; hand over to the task when it must take over."""
        relay = self.relay
        try:
            now = trio.current_time()
            data = self.body.read_now()
            if data or self.armed:  # the pump calls only when bytes (or the end) came
                if self.last is None and self.waiting is not None:
                    # The first bytes: from now on the idle timeout applies, not the
                    # first byte's (later ones only move the deadline when it comes).
                    self.waiting.deadline = now + self.idle_s
                self.last = now
            if data:
                out = relay.feed(data)
                if out:
                    job = relay.job
                    if job.first_byte_at is None:
                        job.first_byte_at = now
                    if not self.sink.try_send(out):
                        self.held = True
        except Exception as exc:  # the task deals with it, as if it had read itself
            self.error = exc
        if self.held or self.finished:
            self.disarm()
            self.wake.set()


async def _read_pumped(
    relay: _Relay, body: DirectBody, sink: Sink, pump: ReadPump, idle_timeout_s: float,
    first_byte_timeout_s: float,
) -> tuple[bool, bool]:
    """``_read_own`` with the reading done by the pump's task: this task waits for the
    end, and writes to the client only what its socket could not take at once."""
    idle_s = idle_timeout_s + _IDLE_GRANULARITY_S
    pumped = _Pumped(relay, body, sink, pump, idle_s)
    started = trio.current_time()
    try:
        pumped.on_readable()  # body bytes that came with the head, if any
        while True:
            if pumped.held:
                pumped.held = False
                since = pumped.last if pumped.last is not None else started
                with trio.move_on_at(since + idle_s) as scope:
                    await sink.flush()
                if scope.cancelled_caught:
                    return True, True
            if pumped.error is not None:
                raise pumped.error
            if pumped.finished:
                return False, False
            pumped.arm()
            while True:
                last: float | None = pumped.last
                deadline = started + first_byte_timeout_s if last is None else last + idle_s
                with trio.move_on_at(deadline) as pumped.waiting:
                    await pumped.wake.wait()
                pumped.waiting = None
                if pumped.wake.is_set():
                    break
                if pumped.last == last:  # nothing came meanwhile
                    return True, False
    finally:
        pumped.disarm()
