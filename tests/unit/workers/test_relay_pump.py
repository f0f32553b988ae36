"""Relaying a stream read by ``workers.pump`` versus by the stream's own task.

The upstream is a real socket (a socketpair: one end is the gateway's upstream
connection, the other a task writing a scripted chunked body), so the pump's epoll set,
``BodyReader.read_now`` and the hand-over to the stream's task all run for real. Every
behaviour is checked in both ways of reading, which must give the same result.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
import trio
from trio.testing import MockClock

from loadtest.self_signed import self_signed
from tests.unit.workers.helpers import delta, make_job, sse, usage_chunk
from workers import relay
from workers.failure import Failure, FailureClass
from workers.job import Job
from workers.pump import ReadPump
from workers.relay import relay_body
from workers.sse import SSESplitter
from workers.tokens import Usage
from workers.upstream import UpstreamResponse
from workers.upstream_http import BodyReader, Connection, read_head
from workers.upstream_net import _Body
from workers.upstream_tls import Tls

HELLO = sse(delta("Hello"))
WORLD = sse(delta(" world"))
USAGE = sse(usage_chunk(12, 3))
DONE = sse("[DONE]")
HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n")
END = b"0\r\n\r\n"
CLOSE = object()  # in a script: the upstream closes its end
IDLE_S = 10.0


def frame(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


@dataclass
class Released:
    """Stands in for the connection pool: what the body gave back."""

    reusable: list[bool] = field(default_factory=list)
    conns: list[Connection] = field(default_factory=list)

    def release(self, conn: Connection, reusable: bool) -> None:
        self.reusable.append(reusable)
        self.conns.append(conn)


@dataclass
class Sink:
    """A client: records what it got; ``hold`` makes every n-th ``try_send`` hold its
    bytes for ``flush``; ``stalled`` never takes anything."""

    hold: int = 0
    stalled: bool = False
    received: list[bytes] = field(default_factory=list)
    tried: int = 0
    flushed: int = 0
    held: bytes | None = None
    writes_now: bool = True

    async def send(self, data: bytes) -> None:
        if self.stalled:
            await trio.sleep_forever()
        self.received.append(data)

    def try_send(self, data: bytes) -> bool:
        self.tried += 1
        if self.stalled or (self.hold and self.tried % self.hold == 0):
            self.held = data
            return False
        self.received.append(data)
        return True

    async def flush(self) -> None:
        data, self.held = self.held, None
        if data is not None:
            self.flushed += 1
            await self.send(data)


class Wire:
    """The upstream's socket: sends ``trickle`` bytes at a time a millisecond apart when
    set (TLS records then arrive in pieces, and a read may complete none of them)."""

    def __init__(self, inner: trio.SocketStream, trickle: int) -> None:
        self.inner, self.trickle = inner, trickle

    async def send_all(self, data: bytes) -> None:
        size = self.trickle or len(data)
        for at in range(0, len(data), size):
            await self.inner.send_all(data[at : at + size])
            if self.trickle:
                await trio.sleep(0.001)


class ServerTls(Tls):
    """The upstream's side of TLS: ``encrypt`` makes a record, ``notify`` a close_notify
    (after which the upstream keeps its socket open, waiting for ours, as many do)."""

    def __init__(self, context: ssl.SSLContext) -> None:  # not Tls's: that makes a client
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.closed = False

    def notify(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):  # it would wait for ours
            self._object.unwrap()
        return self._outgoing.read()


NOTIFY = object()  # in a script, over TLS: close_notify, the socket left open
Step = bytes | float | object | tuple[bytes | object, ...]


async def _play(peer: trio.socket.SocketType, script: list[Step],
                tls: ssl.SSLContext | None, trickle: int) -> None:
    """Send ``script``: bytes, pauses (float), ``CLOSE``, ``NOTIFY``, and tuples whose
    parts go in one write (over TLS, one record each)."""
    wire = Wire(trio.SocketStream(peer), trickle)
    server = ServerTls(tls) if tls is not None else None
    if server is not None:
        await server.handshake(wire.inner)

    def seal(part: bytes | object) -> bytes:
        if part is NOTIFY:
            assert server is not None
            return server.notify()
        assert isinstance(part, bytes)
        return part if server is None else server.encrypt(part)

    for step in script:
        if step is CLOSE:
            peer.close()  # with TLS: no close_notify, as servers often end
            return
        if isinstance(step, float):
            await trio.sleep(step)
        elif isinstance(step, tuple):
            await wire.send_all(b"".join(seal(part) for part in step))
        else:
            await wire.send_all(seal(step))
    await trio.sleep_forever()


@asynccontextmanager
async def upstream(*script: Step, tls: bool = False, trickle: int = 0, head: bytes = HEAD,
                   ) -> AsyncIterator[tuple[UpstreamResponse, Released]]:
    """A response whose head and body come from ``script`` over a real socket, through
    TLS (``workers.upstream_tls``) when ``tls``, ``trickle`` bytes at a time if set."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    conn = Connection((b"https" if tls else b"http", b"localhost", 443 if tls else 80),
                      stream)
    peer = trio.socket.from_stdlib_socket(theirs)
    server_tls, client_tls = self_signed() if tls else (None, None)
    released = Released()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_play, peer, [head, *script], server_tls, trickle)
        if client_tls is not None:
            conn.tls = Tls(client_tls, "localhost")
            await conn.tls.handshake(stream)
        status, headers, keep = await read_head(conn)
        body = _Body(released, conn, BodyReader(conn, status, headers, keep))  # type: ignore[arg-type]
        response = httpx.Response(status, headers=headers, stream=body)
        yield UpstreamResponse(status, response.headers, response), released
        await response.aclose()
        conn.close()
        peer.close()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def reading(mode: str) -> AsyncIterator[ReadPump | None]:
    """The pump (running) for the "pump" modes, None for the stream's own task."""
    if not mode.startswith("pump"):
        yield None
        return
    pump = ReadPump()
    async with trio.open_nursery() as nursery:
        await nursery.start(pump.run)
        yield pump
        assert not pump._handlers, "the stream left its socket in the pump's set"
        nursery.cancel_scope.cancel()


# Each way of reading, over a plain socket and over TLS (``workers.upstream_tls``).
MODES = pytest.mark.parametrize("mode", ["pump", "own", "pump-tls", "own-tls"])


def tls(mode: str) -> bool:
    return mode.endswith("-tls")


async def _relay(mode: str, sink: Sink, *script: Step,
                 token_budget: int | None = None) -> tuple[Failure | None, Released, Job]:
    job, _ = make_job(stream=True, token_budget=token_budget)
    job.sink = sink
    async with reading(mode) as pump, upstream(*script, tls=tls(mode)) as (response, released):
        failure = await relay_body(job, response, IDLE_S, 30.0, pump)
    if pump is not None and sink.writes_now and sink.received:
        assert sink.tried > 0  # the pump's way was taken
    return failure, released, job


@MODES
async def test_events_go_through_unchanged_in_order_and_the_connection_is_reusable(
    mode: str, autojump_clock: MockClock,
) -> None:
    wire = frame(HELLO[:9]) + frame(HELLO[9:] + WORLD) + frame(USAGE) + frame(DONE) + END
    # Network reads that cut chunk frames and events anywhere.
    script: list[bytes | float] = [wire[:5], 0.01, wire[5:40], 0.01, wire[40:90], 0.01,
                                   wire[90:]]
    sink = Sink()
    failure, released, job = await _relay(mode, sink, *script)
    assert failure is None
    assert b"".join(sink.received) == HELLO + WORLD + DONE  # usage chunk: asked for by us
    assert job.known_usage is not None
    assert job.known_usage.completion_tokens == 3
    assert released.reusable == [True]


@pytest.mark.parametrize("mode", ["pump-tls", "own-tls"])
async def test_tls_records_that_arrive_in_pieces_are_relayed_once_whole(
    mode: str, autojump_clock: MockClock,
) -> None:
    """Seven bytes of ciphertext a millisecond: most reads complete no record (nothing
    to relay yet, and nothing left behind in the TLS state when the socket is empty)."""
    job, _ = make_job(stream=True)
    sink = Sink()
    job.sink = sink
    script = [frame(HELLO), 0.05, frame(WORLD) + frame(USAGE), 0.05, frame(DONE) + END]
    async with reading(mode) as pump, upstream(*script, tls=True, trickle=7) as (
            response, released):
        failure = await relay_body(job, response, IDLE_S, 30.0, pump)
    assert failure is None
    assert sink.received == [HELLO, WORLD, DONE]
    assert job.known_usage is not None
    assert job.known_usage.completion_tokens == 3
    assert released.reusable == [True]
    if pump is not None:
        assert sink.tried == 3


@pytest.mark.parametrize("mode", ["pump-tls", "own-tls"])
async def test_tls_records_that_arrive_together_are_all_decrypted_at_once(
    mode: str, autojump_clock: MockClock,
) -> None:
    """Three records in one socket read: all their plaintext is taken, none is left in
    the TLS state where a readable-socket wait would never see it."""
    job, _ = make_job(stream=True)
    sink = Sink()
    job.sink = sink
    script = [frame(HELLO), 0.05, (frame(WORLD), frame(USAGE), frame(DONE) + END)]
    started = trio.current_time()
    async with reading(mode) as pump, upstream(*script, tls=True) as (response, released):
        failure = await relay_body(job, response, IDLE_S, 30.0, pump)
    assert failure is None
    assert trio.current_time() - started < 1.0  # no wait for bytes that had come
    assert b"".join(sink.received) == HELLO + WORLD + DONE
    assert released.reusable == [True]


@pytest.mark.parametrize("mode", ["pump-tls", "own-tls"])
async def test_a_close_notify_read_with_the_last_bytes_ends_a_cut_body_at_once(
    mode: str, autojump_clock: MockClock,
) -> None:
    """The upstream ends TLS in the same write as its last bytes and keeps the socket
    open: no read will follow, so the end is taken with those bytes (a failure, not the
    idle timeout, since the body was cut before [DONE])."""
    started = trio.current_time()
    failure, released, _ = await _relay(mode, Sink(), frame(HELLO), 0.01,
                                        (frame(WORLD), NOTIFY))
    assert trio.current_time() - started < 1.0
    assert failure is not None
    assert failure.kind is not FailureClass.TIMEOUT
    assert released.reusable == [False]


@pytest.mark.parametrize("mode", ["pump-tls", "own-tls"])
async def test_a_body_that_runs_to_a_close_notify_ends_there(
    mode: str, autojump_clock: MockClock,
) -> None:
    """No length, no chunks: the body ends with the connection, here a close_notify in
    the write that carries [DONE], the socket left open."""
    job, _ = make_job(stream=True)
    sink = Sink()
    job.sink = sink
    unframed = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
    started = trio.current_time()
    async with reading(mode) as pump, upstream(HELLO, 0.01, (DONE, NOTIFY), tls=True,
                                               head=unframed) as (response, released):
        failure = await relay_body(job, response, IDLE_S, 30.0, pump)
    assert failure is None
    assert trio.current_time() - started < 1.0
    assert b"".join(sink.received) == HELLO + DONE
    assert released.reusable == [False]


@pytest.mark.parametrize("mode", ["pump-tls", "own-tls"])
async def test_a_connection_whose_tls_ended_with_its_body_is_not_reused(
    mode: str, autojump_clock: MockClock,
) -> None:
    sink = Sink()
    failure, released, _ = await _relay(mode, sink, frame(HELLO), 0.01,
                                        (frame(DONE) + END, NOTIFY))
    assert failure is None
    assert sink.received == [HELLO, DONE]
    assert released.conns[0].dropped()  # the pool discards it instead of reusing it


@MODES
async def test_bytes_the_client_could_not_take_at_once_follow_in_order(
    mode: str, autojump_clock: MockClock,
) -> None:
    events = [sse(delta(f"w{i}")) for i in range(9)] + [DONE]
    script: list[bytes | float] = []
    for event in events:
        script += [frame(event), 0.01]
    sink = Sink(hold=3)
    failure, released, _ = await _relay(mode, sink, *script, END)
    assert failure is None
    assert sink.received == events
    assert released.reusable == [True]
    if mode.startswith("pump"):
        assert sink.flushed == 3


@MODES
async def test_a_silent_upstream_ends_on_the_idle_timeout_with_an_error_event(
    mode: str, autojump_clock: MockClock,
) -> None:
    sink = Sink()
    start = trio.current_time()
    # The first bytes come after a while (the first byte's timeout, 30 s, applied until
    # then); then the upstream says nothing more.
    failure, released, _ = await _relay(mode, sink, 0.5, frame(HELLO))
    waited = trio.current_time() - start
    assert failure is not None
    assert failure.kind == FailureClass.TIMEOUT
    assert 0.5 + IDLE_S <= waited <= 0.5 + IDLE_S + 1.0 + 0.01
    assert sink.received[0] == HELLO
    assert orjson.loads(sink.received[-1][6:])["error"]["type"] == "upstream_error"
    assert released.reusable == [False]


@MODES
async def test_an_upstream_that_hangs_up_before_done_is_a_connection_failure(
    mode: str, autojump_clock: MockClock,
) -> None:
    sink = Sink()
    failure, released, _ = await _relay(mode, sink, frame(HELLO), 0.01, CLOSE)
    assert failure is not None
    assert failure.kind == FailureClass.CONNECT
    assert sink.received[0] == HELLO
    assert b"upstream_error" in sink.received[-1]
    assert released.reusable == [False]


@MODES
@pytest.mark.parametrize("bad", [b"data: {not json\n\n",
                                 b"data: {\"x\": \"" + b"x" * 4096])  # no end in sight
async def test_a_malformed_or_oversized_event_fails_the_stream_against_the_key(
    mode: str, bad: bytes, autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Events larger than the splitter's limit (16 MiB by default; 1 KiB here).
    monkeypatch.setattr(relay, "SSESplitter", functools.partial(SSESplitter,
                                                                max_event_bytes=1024))
    sink = Sink()
    failure, _, _ = await _relay(mode, sink, frame(HELLO), 0.01, frame(bad), 0.01,
                                frame(DONE), END)
    assert failure is not None
    assert failure.upstream_code == "malformed_chunk"
    assert failure.affects_health
    assert sink.received[0] == HELLO
    assert b"malformed_chunk" in sink.received[-1]


@MODES
async def test_the_upstreams_error_event_is_passed_on_once_and_ends_the_stream(
    mode: str, autojump_clock: MockClock,
) -> None:
    error = sse({"error": {"message": "overloaded", "type": "server_error", "code": None}})
    sink = Sink()
    failure, _, _ = await _relay(mode, sink, frame(HELLO), 0.01, frame(error), 0.01,
                                 frame(WORLD), frame(DONE), END)
    assert failure is not None
    assert b"".join(sink.received) == HELLO + error


@MODES
async def test_the_token_budget_cuts_the_stream_with_an_insufficient_quota_event(
    mode: str, autojump_clock: MockClock,
) -> None:
    long = sse(delta("word " * 40))
    sink = Sink()
    failure, _, job = await _relay(mode, sink, frame(HELLO), 0.01, frame(long), 0.01,
                                   frame(WORLD), frame(DONE), END, token_budget=5)
    assert failure is None
    assert job.cut_for_quota
    assert sink.received[0] == HELLO
    assert b"insufficient_quota" in sink.received[-1]
    assert WORLD not in b"".join(sink.received)


@MODES
async def test_a_client_that_takes_nothing_is_cut_after_the_idle_timeout_without_blame(
    mode: str, autojump_clock: MockClock,
) -> None:
    sink = Sink(stalled=True)
    start = trio.current_time()
    failure, released, _ = await _relay(mode, sink, frame(HELLO), 0.01, frame(WORLD))
    assert failure is None
    assert IDLE_S <= trio.current_time() - start <= IDLE_S + 1.0 + 0.02
    assert released.reusable == [False]


@MODES
async def test_cancelling_the_relay_takes_its_socket_out_of_the_pump(
    mode: str, autojump_clock: MockClock,
) -> None:
    job, _ = make_job(stream=True)
    sink = Sink()
    job.sink = sink
    async with reading(mode) as pump, upstream(frame(HELLO), 0.01, frame(WORLD), tls=tls(mode)) as (
            response, released):
        with trio.move_on_after(1.0):
            await relay_body(job, response, IDLE_S, 30.0, pump)
        if pump is not None:
            assert not pump._handlers
    assert sink.received == [HELLO, WORLD]
    assert released.reusable == [False]


async def test_a_sink_that_cannot_write_at_once_keeps_the_stream_in_its_own_task(
    autojump_clock: MockClock,
) -> None:
    # An HTTP/2 client, or direct writes off: every pumped chunk would be held and
    # flushed by the task anyway, with the socket taken out of the set and put back.
    sink = Sink(writes_now=False)
    failure, released, _ = await _relay("pump", sink, frame(HELLO), 0.01, frame(DONE), END)
    assert failure is None
    assert sink.received == [HELLO, DONE]
    assert sink.tried == 0
    assert released.reusable == [True]


@MODES
async def test_a_client_that_leaves_right_after_done_is_billed_the_upstreams_usage(
    mode: str, autojump_clock: MockClock,
) -> None:
    """The openai SDK may close the connection as soon as it has [DONE]: the job is
    aborted and billed by the request task at once (``Dispatcher.finish``), before the
    stream's task runs again; the usage that came is what it sees."""
    job, _ = make_job(stream=True)
    sink = Sink()
    original = sink.try_send
    billed: list[Usage | None] = []

    def leave() -> None:
        job.abort()
        billed.append(job.known_usage)  # what the request task bills, in the same step

    def leaving(data: bytes) -> bool:
        taken = original(data)
        if DONE in data:
            leave()
        return taken

    sink.try_send = leaving  # type: ignore[method-assign]
    sent = sink.send

    async def leaving_send(data: bytes) -> None:
        await sent(data)
        if DONE in data:
            leave()

    sink.send = leaving_send  # type: ignore[method-assign]
    job.sink = sink
    async with reading(mode) as pump, upstream(
            frame(HELLO), 0.01, frame(USAGE) + frame(DONE) + END, tls=tls(mode),
    ) as (response, _released):
        with trio.CancelScope() as scope:
            job.attach(scope)
            await relay_body(job, response, IDLE_S, 30.0, pump)
    assert len(billed) == 1
    assert billed[0] is not None
    assert billed[0].completion_tokens == 3
    assert job.known_usage == billed[0]
