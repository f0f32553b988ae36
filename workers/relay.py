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
from workers.job import Job, put
from workers.sse import SSESplitter
from workers.tokens import MalformedChunk, estimate_completion_tokens, usage_from_response
from workers.upstream import TransportFailure, UpstreamResponse

log = logging.getLogger("airgate.relay")


def error_event(message: str, type_: str, code: str | None) -> bytes:
    """A ``data:`` event carrying an OpenAI error object, as OpenAI sends mid-stream."""
    payload = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def relay_body(
    job: Job, response: UpstreamResponse, idle_timeout_s: float, first_byte_timeout_s: float
) -> Failure | None:
    """Forward the body; return the failure to record against the key, if any."""
    if not job.stream:
        return await _relay_whole(job, response, first_byte_timeout_s)
    return await _relay_stream(job, response, idle_timeout_s, first_byte_timeout_s)


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


async def _deliver(job: Job, data: bytes) -> None:
    """Hand bytes to the client: straight through its sink once it has handed one over
    (it took what was queued before, in the same step), else through the reply channel
    (which has room for a few chunks: no wait)."""
    sink = job.sink
    if sink is not None:
        await sink.send(data)
        return
    await put(job.reply, data)


async def _relay_stream(
    job: Job, response: UpstreamResponse, idle_timeout_s: float, first_byte_timeout_s: float
) -> Failure | None:
    splitter = SSESplitter()
    counter = job.counter
    budget = job.token_budget if job.token_budget is not None else math.inf
    done = False
    forwarded_error = False  # the upstream's own in-stream error event went through
    sending = False  # waiting on the client: a timeout now is the client's, not upstream's
    failure: Failure | None = None
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
                out: list[bytes] = []
                for event in splitter.feed(data):
                    if event.data is None:
                        continue  # upstream comments and pings: we send our own
                    info = counter.feed(event.data)
                    if info.done:
                        done = True
                    elif info.usage_only and not job.include_usage:
                        continue
                    elif info.error is not None:
                        # The upstream reported an error in-stream: pass it on and stop.
                        out.append(event.raw)
                        failure = classify(None, orjson.dumps({"error": info.error}))
                        break
                    out.append(event.raw)
                    if counter.completion_tokens_estimate > budget:
                        job.cut_for_quota = True  # the rest of this batch is not relayed
                        break
                if out:
                    if job.first_byte_at is None:
                        job.first_byte_at = now
                    sending = True
                    await _deliver(job, out[0] if len(out) == 1 else b"".join(out))
                    sending = False
                if failure is not None:
                    forwarded_error = True
                    break
                if job.cut_for_quota:
                    await _deliver(job, error_event(
                        "You exceeded your current quota; the stream was stopped.",
                        "insufficient_quota", "insufficient_quota"))
                    break
        except TransportFailure as exc:
            failure = exc.failure
        except MalformedChunk:
            failure = Failure(kind=FailureClass.TRANSIENT, retry_after_s=None,
                              upstream_type=None, upstream_code="malformed_chunk",
                              failover=False, affects_health=True)
        finally:
            await chunks.aclose()
    job.usage = counter.upstream_usage
    if idle.cancelled_caught:
        if sending:
            # The client read nothing for the whole idle timeout: end its stream, without
            # blaming the key (the error event would not reach it either).
            log.info("request %s: client stalled for %.0f s; stream ended",
                     job.request_id, idle_timeout_s)
            return None
        failure = classify(None, None, timeout=True)
    elif failure is None and not done and not job.cut_for_quota:
        failure = classify(None, None, connect_error=True)  # cut off before [DONE]
    if failure is not None and not forwarded_error:
        await _deliver(job, error_event(
            f"The upstream stream failed ({failure.kind.value}).", "upstream_error",
            failure.upstream_code or failure.kind.value))
    return failure
