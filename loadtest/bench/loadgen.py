"""The load generator: keep-alive HTTP/1.1 connections on raw trio sockets.

Built to cost little per request so that it is not what limits a run: the request is
encoded once, and a response is parsed only as far as needed to find its end (status
line, ``content-length`` or the chunked framing, which is skipped, not decoded). Each of
``concurrency`` tasks owns one connection and sends the next request when the previous
answer has ended (a closed loop). It measures its own CPU (``getrusage``) and samples the
watched server processes' /proc counters at the edges of the measured window.

Run as its own process by :mod:`loadtest.bench.cli`: ``python -m loadtest.bench.loadgen
SPEC_JSON`` prints one JSON object. Must not import ``proxy``, ``workers`` or ``store``.
"""

from __future__ import annotations

import json
import math
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from loadtest.bench.stats import (
    CLOCK_TICKS,
    percentile,
    read_cpu_ticks,
    read_peak_rss_kib,
    read_tree_cpu_ticks,
)

_READ = 65536


class ProtocolError(Exception):
    pass


class ClosedEarly(Exception):
    """The server closed the connection before any byte of the response."""

    def __str__(self) -> str:
        return "closed before the response"


@dataclass
class Spec:
    host: str
    port: int
    request: bytes
    concurrency: int
    duration_s: float
    warmup_s: float
    timeout_s: float = 30.0
    # name -> pid; names ending in "+tree" also count the process's children.
    watch: dict[str, int] = field(default_factory=dict)
    rss_pid: int | None = None
    # A refusal with retry-after (429/503) is waited out and counted as shed, as the
    # openai SDK does; False counts it as an error and sends again at once.
    honour_retry_after: bool = True
    # Also print every measured latency and TTFB (ms), so that rounds can be pooled.
    keep_samples: bool = False
    # Clients start at random over this many seconds, as users arrive, instead of all
    # at once (which keeps timed streams in step for the whole run).
    ramp_s: float = 0.0
    # The native generator's binary (loadtest/bench/native_gen.py) to run instead.
    native_gen: str | None = None


@dataclass
class _Tally:
    window_start: float = math.inf
    window_end: float = math.inf
    latencies: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)
    errors: int = 0
    shed: int = 0  # 429/503 with retry-after: waited out, as the openai SDK does
    samples: dict[str, int] = field(default_factory=dict)
    connected: int = 0
    # Worker id -> when its current request was sent (absent while not in a request).
    in_flight: dict[int, float] = field(default_factory=dict)

    def in_window(self, now: float) -> bool:
        return self.window_start <= now < self.window_end

    def error(self, what: str, now: float) -> None:
        if self.in_window(now):
            self.errors += 1
            if len(self.samples) < 8 or what in self.samples:
                self.samples[what] = self.samples.get(what, 0) + 1


def build_request(host: str, port: int, path: str, key: str | None, body: bytes) -> bytes:
    """The one request every task sends, encoded once."""
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    """(status, content-length or None, chunked, connection-close) from a response head."""
    lower = head.lower()
    status = int(lower[9:12])
    length: int | None = None
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.find(b"\r\n", at + 2)
        length = int(lower[at + 17 : end if end >= 0 else len(lower)])
    chunked = b"\r\ntransfer-encoding: chunked" in lower
    close = b"\r\nconnection: close" in lower
    return status, length, chunked, close


def chunked_end(buf: bytes | bytearray, pos: int, skip: int) -> tuple[int, int, bool]:
    """Walk chunked framing in ``buf`` from ``pos`` with ``skip`` bytes of a chunk left.

    Returns (new pos, bytes still to skip, finished). Chunk data is skipped unread.
    Trailers are not supported (servers here send none).
    """
    size = len(buf)
    while True:
        if skip:
            take = min(skip, size - pos)
            pos += take
            skip -= take
            if skip:
                return pos, skip, False
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return pos, 0, False
        chunk = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        if chunk == 0:
            if size - eol - 2 >= 2:
                return eol + 4, 0, True
            return pos, 0, False
        pos = eol + 2
        skip = chunk + 2


def retry_after_of(head: bytes) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` or else ``retry-after`` (the order the
    openai SDKs read them in), if the head has one."""
    lower = head.lower()
    for name, scale in ((b"\r\nretry-after-ms:", 0.001), (b"\r\nretry-after:", 1.0)):
        at = lower.find(name)
        if at < 0:
            continue
        end = lower.find(b"\r\n", at + 2)
        try:
            return float(lower[at + len(name) : end if end >= 0 else len(lower)]) * scale
        except ValueError:
            continue
    return None


async def read_head(stream: trio.SocketStream) -> tuple[bytearray, int]:
    """Read until the end of a response head: (the bytes so far, where the head ends)."""
    buf = bytearray()
    while (end := buf.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some(_READ)
        if not data:
            if buf:
                raise ProtocolError("eof in head")
            raise ClosedEarly
        buf += data
    return buf, end


async def _exchange(
    stream: trio.SocketStream, request: bytes, sent_at: float
) -> tuple[int, float, bool, bytes, float | None]:
    """Send the request, read its response.

    Returns (status, ttfb, close, body head for errors, retry-after on 429/503)."""
    await stream.send_all(request)
    buf, end = await read_head(stream)
    head = bytes(buf[:end])
    status, length, chunked, close = parse_head(head)
    retry_after = retry_after_of(head) if status in (429, 503) else None
    pos = end + 4
    ttfb = time.perf_counter() - sent_at if len(buf) > pos else -1.0
    if chunked:
        skip, done = 0, False
        pos, skip, done = chunked_end(buf, pos, skip)
        while not done:
            data = await stream.receive_some(_READ)
            if not data:
                raise ProtocolError("eof in chunked body")
            if ttfb < 0:
                ttfb = time.perf_counter() - sent_at
            del buf[:pos]
            buf += data
            pos, skip, done = chunked_end(buf, 0, skip)
        return status, ttfb, close, b"", retry_after
    if length is None:
        raise ProtocolError("response without length")
    have = len(buf) - pos
    body_head = bytes(buf[pos : pos + 200]) if status != 200 else b""
    while have < length:
        data = await stream.receive_some(_READ)
        if not data:
            raise ProtocolError("eof in body")
        if ttfb < 0:
            ttfb = time.perf_counter() - sent_at
        if status != 200 and len(body_head) < 200:
            body_head += data[: 200 - len(body_head)]
        have += len(data)
    return status, ttfb, close, body_head, retry_after


async def _worker(
    spec: Spec, tally: _Tally, ready: trio.Semaphore, go: trio.Event, connected: trio.Event,
    ident: int,
) -> None:
    stream: trio.SocketStream | None = None
    async with ready:
        try:
            stream = await trio.open_tcp_stream(spec.host, spec.port)
        except OSError as exc:
            tally.error(f"connect: {exc}", time.perf_counter())
    tally.connected += 1
    if tally.connected == spec.concurrency:
        connected.set()
    await go.wait()
    if spec.ramp_s > 0:
        # At random, not evenly: even steps of 10 ms would start every stream of a
        # 10-ms-apart scenario in step.
        await trio.sleep(spec.ramp_s * random.Random(ident).random())
    fresh = True
    while True:
        if stream is None:
            try:
                stream = await trio.open_tcp_stream(spec.host, spec.port)
                fresh = True
            except OSError as exc:
                tally.error(f"connect: {exc}", time.perf_counter())
                await trio.sleep(0.05)
                continue
        sent_at = tally.in_flight[ident] = time.perf_counter()
        close = True
        wait_s = 0.0
        with trio.move_on_after(spec.timeout_s) as scope:
            try:
                status, ttfb, close, body, retry_after = await _exchange(
                    stream, spec.request, sent_at)
            except ClosedEarly:
                if not fresh:  # a kept-alive connection the server had just closed: redo
                    await stream.aclose()
                    stream = None
                    continue
                tally.error("closed before response", time.perf_counter())
            except (OSError, trio.BrokenResourceError, ProtocolError, ValueError) as exc:
                tally.error(f"{type(exc).__name__}: {exc}", time.perf_counter())
            else:
                now = time.perf_counter()
                if retry_after is not None and spec.honour_retry_after:
                    if tally.in_window(now):
                        tally.shed += 1
                    wait_s = min(retry_after, 10.0)
                elif status != 200:
                    tally.error(f"status {status} {body[:120]!r}", now)
                elif tally.in_window(now):
                    tally.latencies.append(now - sent_at)
                    tally.ttfbs.append(ttfb)
        del tally.in_flight[ident]
        if scope.cancelled_caught:
            tally.error("timeout", time.perf_counter())
        fresh = False
        if close and stream is not None:
            await stream.aclose()
            stream = None
        if wait_s:
            await trio.sleep(wait_s)


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sample(watch: dict[str, int]) -> dict[str, int | None]:
    return {
        name: read_tree_cpu_ticks(pid) if name.endswith("+tree") else read_cpu_ticks(pid)
        for name, pid in watch.items()
    }


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run_load(spec: Spec) -> dict[str, Any]:
    """Connect, warm up, measure for ``duration_s``, then cancel whatever is in flight."""
    raise_fd_limit(spec.concurrency)
    tally = _Tally()
    go, connected = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        # Open connections at most 50 at a time: a burst of 1000 SYNs overflows a listen
        # backlog of 100 and costs the dropped ones a one-second retransmit.
        ready = trio.Semaphore(50)
        for ident in range(spec.concurrency):
            nursery.start_soon(_worker, spec, tally, ready, go, connected, ident)
        with trio.move_on_after(30):
            await connected.wait()
        go.set()
        await trio.sleep(spec.warmup_s)
        before = sample(spec.watch)
        cpu0, tally.window_start = cpu_self(), time.perf_counter()
        tally.window_end = tally.window_start + spec.duration_s
        await trio.sleep_until(trio.current_time() + spec.duration_s)
        cpu1, now = cpu_self(), time.perf_counter()
        window = now - tally.window_start
        after = sample(spec.watch)
        # Requests still unanswered at the end are not in the percentiles; show them.
        pending = sorted(now - sent for sent in tally.in_flight.values())
        nursery.cancel_scope.cancel()
    return {
        **figures(spec, tally.latencies, tally.ttfbs, before, after),
        "errors": tally.errors,
        "shed": tally.shed,
        "error_samples": [f"{n}x {what}" for what, n in tally.samples.items()],
        "window_s": window,
        "gen_cpu_s": cpu1 - cpu0,
        "unfinished": len(pending),
        "unfinished_older_than_window": sum(age > window for age in pending),
        "oldest_unfinished_s": pending[-1] if pending else 0.0,
    }


def figures(spec: Spec, latencies: list[float], ttfbs: list[float],
            before: dict[str, int | None], after: dict[str, int | None]) -> dict[str, Any]:
    """What every generator reports from its measured window: completions and their
    percentiles (and the samples, when asked), the watched servers' CPU between the
    ``before`` and ``after`` samples, and the served process's peak RSS."""
    process_cpu_s = {}
    for name, start in before.items():
        end = after.get(name)
        if start is not None and end is not None:
            process_cpu_s[name.removesuffix("+tree")] = (end - start) / CLOCK_TICKS
    rss = read_peak_rss_kib(spec.rss_pid) if spec.rss_pid else None
    samples = {
        "latencies_ms": [round(1000 * v, 3) for v in latencies],
        "ttfbs_ms": [round(1000 * v, 3) for v in ttfbs],
    } if spec.keep_samples else {}
    return {
        **samples,
        "completed": len(latencies),
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "ttfb_p50_ms": 1000 * percentile(ttfbs, 50),
        "ttfb_p99_ms": 1000 * percentile(ttfbs, 99),
        "process_cpu_s": process_cpu_s,
        "peak_rss_mib": rss / 1024 if rss is not None else None,
    }


def main(argv: list[str] | None = None) -> None:
    raw = json.loads((argv if argv is not None else sys.argv[1:])[0])
    raw["request"] = raw["request"].encode("latin-1")
    spec = Spec(**raw)
    if spec.native_gen:
        from loadtest.bench.native_gen import run_native

        result = run_native(spec.native_gen, spec)
    else:
        result = trio.run(run_load, spec)
    print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v
                      for k, v in result.items()}))


if __name__ == "__main__":
    main()
