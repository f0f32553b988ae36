"""The open-loop generator: requests at a fixed arrival rate, however fast answers come.

Arrival ``i`` is due at ``t0 + i / rate`` (``uniform``, evenly spaced) or after
exponential gaps (``poisson``, seeded). Each arrival is its own trio task: it takes the
most recently idled keep-alive connection from a pool (LIFO) or opens a new one; when
``max_connections`` are already open it is dropped and counted as *generator-limited*,
never delayed. Latency runs from the arrival's *scheduled* time to the last byte, so a
generator or server that falls behind shows up in the figures (no coordinated omission).

Arrivals due inside the measured window are the ones counted, including those answered
after it closed: the load goes on, unmeasured, until they are all answered or time out.
200 = accepted, 429/503 = shed (with or without ``retry-after``), anything else = error.

Run by :mod:`loadtest.bench.overload` as ``python -m loadtest.bench.openloop SPEC_JSON``;
prints one JSON object. Must not import ``proxy``, ``workers`` or ``store``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import trio

from loadtest.bench.loadgen import (
    ClosedEarly,
    ProtocolError,
    chunked_end,
    cpu_self,
    parse_head,
    raise_fd_limit,
    read_head,
    sample,
)
from loadtest.bench.stats import CLOCK_TICKS, percentile

_READ = 65536
_SHED = (429, 503)
_CODE = re.compile(rb'"code"\s*:\s*"([^"]{1,60})"')


@dataclass
class Spec:
    host: str
    port: int
    request: bytes
    rate_rps: float
    duration_s: float
    warmup_s: float
    arrival: str = "uniform"  # or "poisson"
    max_connections: int = 2000
    timeout_s: float = 30.0  # per arrival, from its scheduled time
    seed: int = 1
    preconnect: int = 0  # idle connections opened (50 at a time) before the first arrival
    # name -> pid; names ending in "+tree" also count the process's children.
    watch: dict[str, int] = field(default_factory=dict)


@dataclass
class _Pool:
    idle: list[trio.SocketStream] = field(default_factory=list)
    open: int = 0  # idle + in use + connecting
    peak: int = 0


@dataclass
class _Tally:
    window_start: float
    window_end: float
    scheduled: int = 0
    gen_limited: int = 0
    accepted: list[float] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)
    with_retry_after: int = 0
    refusal_kinds: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    samples: dict[str, int] = field(default_factory=dict)
    timeouts: int = 0
    connects: list[float] = field(default_factory=list)  # seconds per new connection
    dispatch_lag: list[float] = field(default_factory=list)
    pending: int = 0  # measured arrivals not finished yet
    scheduling_done: bool = False
    drained: trio.Event = field(default_factory=trio.Event)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.samples) < 8 or what in self.samples:
            self.samples[what] = self.samples.get(what, 0) + 1

    def finish_one(self) -> None:
        self.pending -= 1
        if self.scheduling_done and self.pending == 0:
            self.drained.set()


async def _exchange(stream: trio.SocketStream, request: bytes) -> tuple[int, bool, bool, bytes]:
    """Send, read the response to its end: (status, retry-after?, close, non-200 body head)."""
    await stream.send_all(request)
    buf, end = await read_head(stream)
    head = bytes(buf[:end])
    status, length, chunked, close = parse_head(head)
    retry_after = b"\r\nretry-after:" in head.lower()
    pos = end + 4
    if chunked:
        pos, skip, done = chunked_end(buf, pos, 0)
        while not done:
            data = await stream.receive_some(_READ)
            if not data:
                raise ProtocolError("eof in chunked body")
            del buf[:pos]
            buf += data
            pos, skip, done = chunked_end(buf, 0, skip)
        return status, retry_after, close, b""
    if length is None:
        raise ProtocolError("response without length")
    body = bytes(buf[pos : pos + 200]) if status != 200 else b""
    have = len(buf) - pos
    while have < length:
        data = await stream.receive_some(_READ)
        if not data:
            raise ProtocolError("eof in body")
        if status != 200 and len(body) < 200:
            body += data[: 200 - len(body)]
        have += len(data)
    return status, retry_after, close, body


def _classify(tally: _Tally, status: int, retry_after: bool, body: bytes, latency: float) -> None:
    if status == 200:
        tally.accepted.append(latency)
    elif status in _SHED:
        tally.refused.append(latency)
        tally.with_retry_after += retry_after
        match = _CODE.search(body)
        kind = f"{status} {match.group(1).decode(errors='replace') if match else '?'}"
        tally.refusal_kinds[kind] = tally.refusal_kinds.get(kind, 0) + 1
    else:
        tally.error(f"status {status} {body[:120]!r}")


async def _arrival(spec: Spec, pool: _Pool, tally: _Tally, due: float) -> None:
    """One request; ``tally`` is a scratch one for arrivals outside the measured window."""
    tally.dispatch_lag.append(trio.current_time() - due)
    stream = pool.idle.pop() if pool.idle else None
    if stream is None:
        if pool.open >= spec.max_connections:
            tally.gen_limited += 1
            tally.finish_one()
            return
        pool.open += 1
        pool.peak = max(pool.peak, pool.open)
    keep = False
    try:
        with trio.move_on_at(due + spec.timeout_s) as scope:
            try:
                fresh = stream is None
                while True:
                    if stream is None:
                        began = trio.current_time()
                        stream = await trio.open_tcp_stream(spec.host, spec.port)
                        fresh = True
                        tally.connects.append(trio.current_time() - began)
                    try:
                        status, retry_after, close, body = await _exchange(stream, spec.request)
                        break
                    except ClosedEarly:
                        if fresh:
                            raise
                        await trio.aclose_forcefully(stream)  # went stale while idle: redo
                        stream = None
            except (ClosedEarly, OSError, trio.BrokenResourceError, ProtocolError,
                    ValueError) as exc:
                tally.error(f"{type(exc).__name__}: {exc}")
            else:
                keep = not close
                _classify(tally, status, retry_after, body, trio.current_time() - due)
        if scope.cancelled_caught:
            tally.timeouts += 1
            tally.error("timeout")
    finally:
        if keep and stream is not None:
            pool.idle.append(stream)
        else:
            pool.open -= 1
            if stream is not None:
                await trio.aclose_forcefully(stream)
        tally.finish_one()


async def _schedule(spec: Spec, pool: _Pool, tally: _Tally, scratch: _Tally, t0: float,
                    nursery: trio.Nursery) -> None:
    """Start one task per arrival until the window's arrivals are all answered."""
    rng = random.Random(spec.seed)
    gap = 1.0 / spec.rate_rps
    due = t0
    while True:
        if due >= tally.window_end and not tally.scheduling_done:
            tally.scheduling_done = True
            if tally.pending == 0:
                tally.drained.set()
        await trio.sleep_until(due)
        into = tally if tally.window_start <= due < tally.window_end else scratch
        into.scheduled += 1
        into.pending += 1
        nursery.start_soon(_arrival, spec, pool, into, due)
        due += rng.expovariate(spec.rate_rps) if spec.arrival == "poisson" else gap


def _ms(values: list[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if math.isnan(value) else 1000 * value


async def _preconnect(spec: Spec, pool: _Pool) -> None:
    """Fill the pool before the first arrival, 50 connects at a time: a cold burst of
    connects overflows a listen backlog of 100 and costs the dropped SYNs 1 s or more."""
    limit = trio.Semaphore(50)

    async def one() -> None:
        async with limit:
            with contextlib.suppress(OSError):  # a connection short; arrivals open their own
                pool.idle.append(await trio.open_tcp_stream(spec.host, spec.port))

    async with trio.open_nursery() as nursery:
        for _ in range(min(spec.preconnect, spec.max_connections)):
            nursery.start_soon(one)
    pool.open = pool.peak = len(pool.idle)


async def run_open_loop(spec: Spec) -> dict[str, Any]:
    if spec.arrival not in ("uniform", "poisson"):
        raise ValueError(f"arrival must be uniform or poisson, not {spec.arrival!r}")
    raise_fd_limit(spec.max_connections)
    pool = _Pool()
    await _preconnect(spec, pool)
    t0 = trio.current_time() + 0.05
    start = t0 + spec.warmup_s
    tally = _Tally(window_start=start, window_end=start + spec.duration_s)
    scratch = _Tally(window_start=math.inf, window_end=math.inf)  # outside the window
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_schedule, spec, pool, tally, scratch, t0, nursery)
        await trio.sleep_until(tally.window_start)
        before, cpu0 = sample(spec.watch), cpu_self()
        await trio.sleep_until(tally.window_end)
        cpu1, after = cpu_self(), sample(spec.watch)
        window = trio.current_time() - tally.window_start
        with trio.move_on_at(tally.window_end + spec.timeout_s + 2):
            await tally.drained.wait()
        drain_s = trio.current_time() - tally.window_end
        nursery.cancel_scope.cancel()
    for stream in pool.idle:
        await trio.aclose_forcefully(stream)
    process_cpu_s = {}
    for name, begin in before.items():
        end = after.get(name)
        if begin is not None and end is not None:
            process_cpu_s[name.removesuffix("+tree")] = (end - begin) / CLOCK_TICKS
    sent = tally.scheduled - tally.gen_limited
    refused = len(tally.refused)
    span = spec.duration_s  # arrivals are counted by due time, over exactly this span
    return {
        "offered_rps": spec.rate_rps, "arrival": spec.arrival,
        "window_s": window, "drain_s": drain_s,
        "scheduled": tally.scheduled, "sent": sent,
        "achieved_rps": sent / span, "gen_limited": tally.gen_limited,
        "accepted": len(tally.accepted), "accepted_rps": len(tally.accepted) / span,
        "shed": refused, "shed_rps": refused / span,
        "errors": tally.errors, "timeouts": tally.timeouts,
        "error_samples": [f"{n}x {what}" for what, n in tally.samples.items()],
        "refusal_kinds": tally.refusal_kinds, "unfinished": tally.pending,
        # Unmeasured arrivals (warm-up, drain) that timed out: they held connections.
        "outside_window_timeouts": scratch.timeouts,
        **{f"accepted_p{q}_ms": _ms(tally.accepted, q) for q in (50, 90, 99)},
        "accepted_max_ms": _ms(tally.accepted, 100),
        **{f"refusal_p{q}_ms": _ms(tally.refused, q) for q in (50, 99)},
        "retry_after_share": tally.with_retry_after / refused if refused else None,
        "dispatch_lag_p99_ms": _ms(tally.dispatch_lag, 99),
        "dispatch_lag_max_ms": _ms(tally.dispatch_lag, 100),
        "new_connections": len(tally.connects),
        "connect_p99_ms": _ms(tally.connects, 99),
        "connects_over_1s": sum(c >= 1.0 for c in tally.connects),
        "peak_open_connections": pool.peak,
        "gen_cpu_s": cpu1 - cpu0, "gen_cpu_share": (cpu1 - cpu0) / window,
        "process_cpu_s": process_cpu_s,
        "process_cpu_share": {n: s / window for n, s in process_cpu_s.items()},
    }


def main(argv: list[str] | None = None) -> None:
    raw = json.loads((argv if argv is not None else sys.argv[1:])[0])
    raw["request"] = raw["request"].encode("latin-1")
    print(json.dumps(trio.run(run_open_loop, Spec(**raw))))


if __name__ == "__main__":
    main()
