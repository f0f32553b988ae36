"""The many-open-streams generator: one long streaming request per connection, or
many per HTTP/2 connection.

Each stream has its own connection (raw trio socket, HTTP/1.1): it starts at its slot of
the ramp, sends the request once, reads the status line and then the chunked body to its
end, decoding only the chunk framing and looking for ``data: [DONE]`` and in-stream
``{"error"`` events. With ``http2`` the streams share h2c connections
(:mod:`loadtest.bench.h2client`), ``streams_per_connection`` each: a stream takes the
newest connection with room or opens one, and reads its response's events. Open means "a
200 head arrived and the body has not ended". The number open is recorded at fixed ticks
(wall clock from ``start_at``) so that the parent can add up several generator processes
tick by tick.

Run by :mod:`loadtest.bench.streams` as ``python -m loadtest.bench.streamgen SPEC_JSON``;
prints one JSON object. Must not import ``proxy``, ``workers`` or ``store``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from loadtest.bench.h2client import H2Conn
from loadtest.bench.loadgen import parse_head
from loadtest.bench.stats import percentile

T = TypeVar("T")
_READ = 65536
_DONE = b"data: [DONE]"
_ERROR = b'data: {"error"'
_TAIL = 32  # payload bytes kept between reads, so a marker split across reads is found
OK = "ok"


@dataclass
class Spec:
    host: str
    port: int
    request: bytes
    first: int  # this process opens streams first, first + step, ... below total
    step: int
    total: int
    ramp_s: float
    start_at: float  # time.time() of the ramp's start, shared by every generator
    tick_s: float
    timeout_s: float
    connect_parallel: int
    http2: bool = False
    streams_per_connection: int = 100
    path: str = "/v1/chat/completions"
    key: str = ""
    body: str = ""


@dataclass
class _Tally:
    open_now: int = 0
    peak_open: int = 0
    running: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    connect_s: list[float] = field(default_factory=list)  # its ramp slot -> connected
    head_s: list[float] = field(default_factory=list)  # request sent -> 200 head
    duration_s: list[float] = field(default_factory=list)  # request sent -> end, OK ones
    series: list[int] = field(default_factory=list)
    failed_at: list[float] = field(default_factory=list)  # time.time() of each failure

    def outcome(self, what: str, detail: str = "") -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1
        if what != OK:
            self.failed_at.append(time.time())
        if what != OK and len(self.samples) < 5:
            self.samples.append(f"{what}: {detail}" if detail else what)


class Dechunker:
    """Incremental decoder of HTTP/1.1 chunked framing; ``feed`` returns payload bytes."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._left = 0  # bytes of the current chunk's data still to come
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        buf = self._buf
        buf += data
        out = bytearray()
        pos = 0
        while not self.finished:
            if self._left:
                take = min(self._left, len(buf) - pos)
                out += buf[pos : pos + take]
                pos += take
                self._left -= take
                if self._left:
                    break
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            line = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
            pos = eol + 2
            if not line:  # the CRLF that closes a chunk's data
                continue
            size = int(line, 16)
            if size == 0:
                self.finished = True  # trailers, if any, are not read
            self._left = size
        del buf[:pos]
        return bytes(out)


@dataclass
class _Progress:
    """How far one stream got, for the failure reports."""

    sent: float = 0.0
    phase: str = "sending the request"
    reads: int = 0

    def where(self) -> str:
        return f"{self.phase}, {time.perf_counter() - self.sent:.1f} s after sending"


class _Markers:
    """Looks for ``data: [DONE]`` and error events in a body read piece by piece."""

    def __init__(self) -> None:
        self._tail = b""
        self.done = False
        self.error = b""

    def feed(self, data: bytes) -> None:
        payload = self._tail + data
        if not self.done and _DONE in payload:
            self.done = True
        if not self.error and (at := payload.find(_ERROR)) >= 0:
            self.error = payload[at : at + 200]
        self._tail = payload[-_TAIL:]


async def _read_stream(stream: trio.SocketStream, request: bytes, tally: _Tally,
                       progress: _Progress) -> str:
    """Send the request and read the response to its end; the outcome (OK or why not)."""
    sent = progress.sent = time.perf_counter()
    await stream.send_all(request)
    progress.phase = "waiting for the head"
    buf = bytearray()
    while (end := buf.find(b"\r\n\r\n")) < 0:
        data = await stream.receive_some(_READ)
        if not data:
            return "closed before the response head"
        buf += data
    status, length, chunked, _ = parse_head(bytes(buf[:end]))
    rest = bytes(buf[end + 4 :])
    if status != 200 or not chunked:
        with trio.move_on_after(2):  # the start of the error body, for the report
            while len(rest) < min(length or 300, 300) and (
                    data := await stream.receive_some(_READ)):
                rest += data
        tally.outcome(f"status {status}", rest[:200].decode(errors="replace"))
        return ""
    markers = _opened(tally, progress, sent)
    try:
        body = Dechunker()
        data = rest
        while True:
            markers.feed(body.feed(data))
            if body.finished:
                break
            data = await stream.receive_some(_READ)
            progress.reads += 1
            if not data:
                return "cut (eof before the end of the body)" + (
                    " after [DONE]" if markers.done else "")
    finally:
        tally.open_now -= 1
    return _ended(markers, tally, sent)


def _opened(tally: _Tally, progress: _Progress, sent: float) -> _Markers:
    """A 200 head arrived: the stream counts as open until its body ends; the markers
    its body is read into."""
    tally.head_s.append(time.perf_counter() - sent)
    progress.phase = "in the body"
    tally.open_now += 1
    tally.peak_open = max(tally.peak_open, tally.open_now)
    return _Markers()


def _ended(markers: _Markers, tally: _Tally, sent: float) -> str:
    """The outcome of a body read to its end."""
    if markers.error:
        tally.outcome("error event in the stream", markers.error.decode(errors="replace"))
        return ""
    if not markers.done:
        return "ended without data: [DONE]"
    tally.duration_s.append(time.perf_counter() - sent)
    return OK


async def _read_stream_h2(conn: H2Conn, spec: Spec, tally: _Tally,
                          progress: _Progress) -> str:
    """:func:`_read_stream` over one HTTP/2 stream."""
    body = spec.body.encode()
    headers = [(b":method", b"POST"), (b":scheme", b"http"),
               (b":authority", f"{spec.host}:{spec.port}".encode()),
               (b":path", spec.path.encode()), (b"content-type", b"application/json"),
               (b"authorization", f"Bearer {spec.key}".encode()),
               (b"content-length", str(len(body)).encode())]
    sent = progress.sent = time.perf_counter()
    stream_id, events = await conn.request(headers, body)
    try:
        return await _read_events(events, tally, progress, sent)
    finally:
        await conn.cancel(stream_id)  # a no-op once the stream ended


async def _read_events(events: trio.MemoryReceiveChannel[tuple[str, Any]], tally: _Tally,
                       progress: _Progress, sent: float) -> str:
    progress.phase = "waiting for the head"
    kind, value = await events.receive()
    if kind != "head":
        return f"{kind} before the response head ({value})"
    if value != 200:
        rest = b""
        with trio.move_on_after(2):
            async for kind, data in events:
                if kind != "data" or len(rest) > 300:
                    break
                rest += data
        tally.outcome(f"status {value}", rest[:200].decode(errors="replace"))
        return ""
    markers = _opened(tally, progress, sent)
    try:
        async for kind, value in events:
            if kind == "data":
                markers.feed(value)
                progress.reads += 1
            elif kind == "end":
                break
            else:
                return f"cut ({kind}: {value})" + (" after [DONE]" if markers.done else "")
        else:
            return "cut (the stream's events ended)"
    finally:
        tally.open_now -= 1
    return _ended(markers, tally, sent)


class _H2Pool:
    """The h2c connections of one generator process."""

    def __init__(self, spec: Spec, nursery: trio.Nursery, limiter: trio.Semaphore) -> None:
        self._spec = spec
        self._nursery = nursery
        self._limiter = limiter
        self._opening = trio.Lock()
        self.conns: list[H2Conn] = []

    async def take(self) -> H2Conn:
        """A connection with room for one more stream (counted in), opened if need be.
        One connection is opened at a time, so streams that start while it connects
        wait for it rather than open their own."""
        async with self._opening:
            for conn in reversed(self.conns):
                if conn.has_room:
                    conn.active += 1
                    return conn
            async with self._limiter:
                stream = await trio.open_tcp_stream(self._spec.host, self._spec.port)
            conn = H2Conn(stream, self._spec.streams_per_connection)
            try:
                await conn.start(self._nursery)
            except (OSError, trio.BrokenResourceError) as exc:
                await conn.aclose()
                raise OSError(f"h2c connection failed: {exc!r}") from exc
            self.conns.append(conn)
            conn.active += 1
            return conn

    async def aclose(self) -> None:
        for conn in self.conns:
            await conn.aclose()


async def _connected(spec: Spec, tally: _Tally, index: int,
                     connect: Callable[[], Awaitable[T]]) -> T | None:
    """At stream ``index``'s slot of the ramp, ``connect``; None (and the failure
    recorded) if that fails."""
    start = spec.start_at + spec.ramp_s * index / max(spec.total, 1)
    await trio.sleep(max(0.0, start - time.time()))
    try:
        conn = await connect()
    except OSError as exc:
        tally.outcome("connect failed", str(exc))
        return None
    tally.connect_s.append(time.time() - start)
    return conn


async def _attempt(spec: Spec, tally: _Tally,
                   read: Callable[[_Progress], Awaitable[str]]) -> None:
    """Run one stream's ``read`` within the timeout and record why it failed, if it did."""
    progress = _Progress(sent=time.perf_counter())
    with trio.move_on_after(spec.timeout_s) as scope:
        try:
            what = await read(progress)
        except (OSError, trio.BrokenResourceError) as exc:
            cause = exc.__cause__ or exc
            what = f"connection error ({type(cause).__name__}) {progress.phase}"
        except ValueError as exc:
            what = f"bad framing ({exc})"
    if scope.cancelled_caught:
        what = f"timeout {progress.phase}"
    if what:
        tally.outcome(what, f"{progress.where()}, {progress.reads} body reads")


async def _one_h2(spec: Spec, tally: _Tally, index: int, pool: _H2Pool) -> None:
    conn = await _connected(spec, tally, index, pool.take)
    if conn is None:
        return
    try:
        await _attempt(spec, tally,
                       lambda progress: _read_stream_h2(conn, spec, tally, progress))
    finally:
        conn.active -= 1


async def _one(spec: Spec, tally: _Tally, index: int, limiter: trio.Semaphore) -> None:
    async def connect() -> trio.SocketStream:
        async with limiter:
            return await trio.open_tcp_stream(spec.host, spec.port)

    stream = await _connected(spec, tally, index, connect)
    if stream is None:
        return
    try:
        await _attempt(spec, tally,
                       lambda progress: _read_stream(stream, spec.request, tally, progress))
    finally:
        await stream.aclose()


async def _ticker(spec: Spec, tally: _Tally) -> None:
    """``open_now`` at start_at + k * tick_s, while any stream of ours is running."""
    k = 0
    while tally.running:
        await trio.sleep(max(0.0, spec.start_at + k * spec.tick_s - time.time()))
        tally.series.append(tally.open_now)
        k += 1


async def run(spec: Spec) -> dict[str, Any]:
    tally = _Tally()
    limiter = trio.Semaphore(spec.connect_parallel)
    indices = range(spec.first, spec.total, spec.step)
    tally.running = len(indices)

    async with trio.open_nursery() as readers:
        pool = _H2Pool(spec, readers, limiter)

        async def one(index: int) -> None:
            try:
                if spec.http2:
                    await _one_h2(spec, tally, index, pool)
                else:
                    await _one(spec, tally, index, limiter)
            finally:
                tally.running -= 1

        async with trio.open_nursery() as nursery:
            for index in indices:
                nursery.start_soon(one, index)
            nursery.start_soon(_ticker, spec, tally)
        await pool.aclose()
    connections = len(pool.conns) if spec.http2 else len(indices)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    ms = [1000 * v for v in tally.head_s]
    connect_ms = [1000 * v for v in tally.connect_s]
    return {
        "streams": len(indices), "connections": connections, "start_at": spec.start_at,
        "outcomes": tally.outcomes, "samples": tally.samples,
        "peak_open": tally.peak_open, "series": tally.series, "failed_at": tally.failed_at,
        "head_ms": [percentile(ms, 50), percentile(ms, 99), max(ms, default=0.0)],
        "connect_ms": [percentile(connect_ms, 50), percentile(connect_ms, 99),
                       max(connect_ms, default=0.0)],
        "duration_s": [percentile(tally.duration_s, 50), max(tally.duration_s, default=0.0)],
        "cpu_s": usage.ru_utime + usage.ru_stime, "max_rss_kib": usage.ru_maxrss,
    }


def main(argv: list[str] | None = None) -> None:
    raw = json.loads((argv if argv is not None else sys.argv[1:])[0])
    raw["request"] = raw["request"].encode("latin-1")
    spec = Spec(**raw)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = len(range(spec.first, spec.total, spec.step)) + 64
    if soft < need <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = trio.run(run, spec)
    print(json.dumps(result, default=lambda v: None))


if __name__ == "__main__":
    main()
