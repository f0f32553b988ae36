"""Writing a response to the client without two passes through the trio scheduler.

Owns :class:`DirectSendServer`, :func:`configure` and :func:`chunk_writer`. hypercorn's
trio worker writes every piece of a response (the head, each body chunk, the end)
through ``TCPServer.protocol_send``: an uncontended ``trio.Lock`` (one pass through the
scheduler) and then ``SocketStream.send_all`` (another), even when the socket's buffer
has room. A relayed stream writes once per upstream event, and on a busy gateway each
pass is milliseconds of latency and a share of the CPU.

``DirectSendServer`` first offers the bytes to the socket directly: when nothing else is
writing on the connection and the kernel takes them all, the write is done without
yielding. Otherwise (a write in progress, a full buffer, a closed or broken socket)
hypercorn writes what is left its own way, shielded as hypercorn shields its writes, and
its handling of closed and broken connections applies unchanged. Bytes stay in order:
a direct write happens only while hypercorn's lock is free, so no hypercorn write is in
progress or waiting.

TLS connections (``trio.SSLStream``) always go hypercorn's way.

Keep-alive: hypercorn stops its idle timer task when a request starts and starts a new
one when the response ends, each behind a ``trio.Lock`` (a few scheduler passes and a
task per request, the first of them before the app even starts). Here one watcher task
per connection sleeps towards a deadline that requests move: same timeout, same close
at shutdown for idle connections, no task churn. Non-stream c=50: +7 % requests/s.

:func:`chunk_writer` goes one step further for a streamed body on HTTP/1.1: it frames
each chunk itself (``<hex length>\\r\\n<data>\\r\\n``, what h11's chunked writer
writes) and hands the bytes to the connection, skipping hypercorn's ASGI message
checks and h11's event machinery (with the lock and ``send_all``, hypercorn's send path
was ~24 % of a relayed stream's CPU in a py-spy profile, ~11 % of it Python). It is
used only while hypercorn's state for the response says a chunked body is being sent;
the head and the end of the body still go through ASGI, so h11 and hypercorn see the
response start and finish as usual.

Early refusals: with a door configured (``proxy.early_refusal``), each read that holds
one whole plain request, on a connection between requests, is shown to the door while
it is active; a request the door refuses is answered here and never reaches h11.
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import trio
from h11._writers import ChunkedWriter
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer

from proxy.early_refusal import EarlyDoor, encode_response, one_request

_DIRECT = "airgate_direct_send"  # attributes this module sets on hypercorn's Config
_DOOR = "airgate_early_door"
_SPAWN_APP = TaskGroup.spawn_app


class _EndedProtocol:
    """What a finished connection's server holds instead of its protocol."""

    async def handle(self, event: Any) -> None:
        pass


_ENDED_PROTOCOL = _EndedProtocol()


class DirectSendServer(TCPServer):
    """hypercorn's connection handler with direct writes (see the module docstring).

    Behaves exactly as hypercorn's own when its config was not set up by
    :func:`configure` with ``direct_send=True``.
    """

    ended = False  # the connection is over and unlinked: writes do nothing

    def __init__(self, app: Any, config: Config, context: Any, state: Any,
                 stream: Any) -> None:
        super().__init__(app, config, context, state, stream)
        self.direct: bool = getattr(config, _DIRECT, False)
        self._door: EarlyDoor | None = getattr(config, _DOOR, None) if self.direct else None
        self._idle_at = math.inf  # when this connection closes unless a request comes
        self._idle_wake: trio.Event | None = None  # set when it turns idle
        self._idle_scope = trio.CancelScope()
        self._told_until = -math.inf  # the end of the wait the last early refusal told

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            self._unlink()

    def _unlink(self) -> None:
        """Break the connection's reference cycles once it is over, so that reference
        counting frees it at once. Its protocol holds this server's ``protocol_send``
        and the server holds the protocol (and its task group, which the protocol holds
        too); the methods this class put on hypercorn's task group and protocol hold
        those. Left linked, every closed connection was ~34 objects for the garbage
        collector, whose pass over them stopped the process for 20-50 ms at a time under
        connection churn. The socket, its lock and the config stay: a write that was
        already under way when the connection ended (a relay's, from another task)
        finishes against them, and a failed one tells the stand-in protocol, which
        does nothing. Writes that start now do nothing (``ended``)."""
        task_group = self.__dict__.pop("_task_group", None)
        if task_group is not None:
            vars(task_group).pop("spawn_app", None)
        protocol = self.__dict__.get("protocol")
        if protocol is not None:
            vars(protocol).pop("handle", None)
        self.protocol = _ENDED_PROTOCOL  # type: ignore[assignment]
        self.ended = True

    async def protocol_send(self, event: Any) -> None:
        if self.ended:
            return
        kind = type(event)
        if kind is RawData and self.direct:
            await self.send_bytes(event.data)
        elif kind is Updated and self.direct:
            self._idle(event.idle)
        else:
            if kind is Closed:
                self._idle_scope.cancel()
            await super().protocol_send(event)

    def _idle(self, idle: bool) -> None:
        """A request started (False) or the connection is idle again (True): move the
        deadline the keep-alive watcher sleeps towards; no task is started or stopped."""
        if not idle:
            self._idle_at = math.inf
            return
        self._idle_at = trio.current_time() + self.config.keep_alive_timeout
        if self._idle_wake is not None:
            self._idle_wake.set()
            self._idle_wake = None

    async def _watch_idle(self) -> None:
        """Close the connection when it stays idle past ``keep_alive_timeout``, or at
        once when the server shuts down while it is idle (what hypercorn's own timer
        does, with one task per connection instead of a new one per request)."""
        terminated = self.context.terminated
        with self._idle_scope:
            while True:
                at = self._idle_at
                if at == math.inf:  # busy: wait until it is idle again
                    self._idle_wake = trio.Event()
                    await self._idle_wake.wait()
                    continue
                with trio.move_on_at(at):
                    await terminated.wait()
                if self._idle_at != math.inf and (
                        terminated.is_set() or trio.current_time() >= self._idle_at):
                    break
        if not self._idle_scope.cancelled_caught:
            with trio.CancelScope(shield=True):
                await self._initiate_server_close()

    async def _read_data(self) -> None:
        if not self.direct:
            await super()._read_data()
            return
        await self.idle_task.stop()  # hypercorn's timer task; _watch_idle does its work
        self._idle(True)
        self._task_group.spawn(self._watch_idle)
        queue_at_once(self._task_group)
        door = self._door
        if door is not None:  # each read goes past the door before hypercorn parses it
            handle = self.protocol.handle

            async def screened(event: Any) -> None:
                if type(event) is RawData and door.active() and await self._refused(
                        door, event.data):
                    return
                await handle(event)

            self.protocol.handle = screened  # type: ignore[method-assign]
        try:
            await super()._read_data()
        finally:
            self._idle_scope.cancel()

    async def _refused(self, door: EarlyDoor, data: bytes) -> bool:
        """Answer a whole request the door refuses without parsing it through h11 or
        starting a task for it; False (nothing done) for anything else."""
        protocol = self.protocol.protocol
        if type(protocol) is not H11Protocol or protocol.stream is not None:
            return False
        connection = protocol.connection
        if type(connection) is not h11.Connection or connection.our_state is not h11.IDLE \
                or connection.their_state is not h11.IDLE or connection.trailing_data[0]:
            return False  # between requests, with nothing of the next one buffered
        request = one_request(data)
        if request is None:
            return False
        answer = door.refusal(*request)
        if answer is None:
            return False
        # Refused as it arrived; back before the wait it was told, it may hear so later
        # (AIRGATE_REFUSAL_HOLD_MS, workers.overload). Asking the door again after the
        # hold would admit some 50 ms late: the 2x overload check's accepted p50 went
        # from ~30 to ~80 ms.
        early = self._told_until - trio.current_time()
        if early > 0:
            await door.hold(early)
        await self.send_bytes(encode_response(answer.status, answer.headers, answer.body,
                                              self.config.response_headers("h11")))
        self._told_until = trio.current_time() + answer.retry_after_s
        return True

    def send_now(self, data: bytes) -> int:
        """Write what the socket takes of ``data`` now, without waiting: the number of
        bytes written, or -1 (nothing written) when a direct write does not apply
        (hypercorn is writing or waiting to, TLS, a closed or broken socket)."""
        if self.ended:
            return -1
        stream: trio.abc.Stream = self.stream  # hypercorn annotates it as TLS only
        if type(stream) is not trio.SocketStream or self.send_lock.locked():
            return -1
        try:
            # fileno() is -1 once the socket is closed: never someone else's fd.
            return os.write(stream.socket.fileno(), data)
        except BlockingIOError:
            return 0
        except OSError:  # a dead socket: hypercorn's way handles it
            return -1

    async def send_bytes(self, data: bytes) -> None:
        """Write ``data`` on this connection, directly when it can be done at once."""
        if self.ended:
            return
        sent = self.send_now(data)
        if sent == len(data):
            return
        if sent > 0:
            await self.send_rest(data[sent:])
            return
        await super().protocol_send(RawData(data=data))

    async def send_rest(self, rest: bytes) -> None:
        """Write the rest of bytes that are partly on the wire: it must follow, even
        if the task is being cancelled."""
        if self.ended:
            return
        with trio.CancelScope(shield=True):
            await super().protocol_send(RawData(data=rest))


def queue_at_once(task_group: Any) -> None:
    """Make the request messages hypercorn queues for an app of ``task_group`` go in
    without a pass through the scheduler when the app's queue has room.

    hypercorn queues a request's body and then its end with ``MemorySendChannel.send``,
    which yields after each message: a body and its end that arrived in one read went
    in a pass apart, and the app, started in between, waited that pass for the end
    (half of all requests on a busy gateway). The messages still go in order, and a
    full queue is still waited on. Does nothing if hypercorn's task group is not laid
    out as expected."""
    spawn_app = getattr(task_group, "spawn_app", None)
    if spawn_app is None or getattr(spawn_app, "__func__", None) is not _SPAWN_APP:
        return

    async def spawn_app_queueing_at_once(*args: Any) -> Callable[[Any], Awaitable[None]]:
        put = await spawn_app(*args)
        channel = getattr(put, "__self__", None)
        if type(channel) is not trio.MemorySendChannel:
            return put  # type: ignore[no-any-return]

        async def put_at_once(message: Any) -> None:
            try:
                channel.send_nowait(message)
            except trio.WouldBlock:
                await channel.send(message)

        return put_at_once

    task_group.spawn_app = spawn_app_queueing_at_once


def configure(config: Config, *, direct_send: bool, door: EarlyDoor | None = None) -> bool:
    """Serve ``config``'s connections with :class:`DirectSendServer`: direct writes when
    ``direct_send``, and early refusals from ``door`` (with direct writes only). True if
    direct writes are on.

    Makes hypercorn's trio worker create :class:`DirectSendServer` for every connection
    it accepts (it looks the name up in ``hypercorn.trio.run`` each time); a server whose
    config was not configured here behaves as hypercorn's own. Changes nothing when the
    installed hypercorn is not laid out as expected: every write then goes hypercorn's way.
    """
    if getattr(hypercorn_run, "TCPServer", None) not in (TCPServer, DirectSendServer):
        return False
    setattr(hypercorn_run, "TCPServer", DirectSendServer)  # noqa: B010  # not re-exported
    setattr(config, _DIRECT, direct_send)
    setattr(config, _DOOR, door)
    return direct_send


def _frame(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body (what h11's chunked writer writes)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class ChunkWriter:
    """Writes the body chunks of one HTTP/1.1 response being sent chunked (see
    :func:`chunk_writer`)."""

    __slots__ = ("_connection", "_server", "_stream")

    _SENDING = ASGIHTTPState.RESPONSE
    _BODY = h11.SEND_BODY

    def __init__(self, stream: HTTPStream, connection: h11.Connection,
                 server: DirectSendServer) -> None:
        self._stream = stream
        self._connection = connection
        self._server = server

    def _applies(self) -> bool:
        stream = self._stream
        return not stream.closed and stream.state is self._SENDING \
            and self._connection.our_state is self._BODY

    async def write(self, data: bytes) -> bool:
        """Write ``data`` as one chunk. False, without writing, when the response is no
        longer a chunked body in progress (the client left, the connection failed):
        the caller then sends through ASGI, which handles those cases."""
        if not self._applies():
            return False
        if data:
            await self._server.send_bytes(_frame(data))
        return True

    def write_now(self, data: bytes) -> bytes | None:
        """Write ``data`` as one chunk without waiting, as far as the socket takes it:
        the framed bytes still to write with ``write_rest`` (``b""``: all written), or
        None when nothing was written (``write`` then does it the waiting way)."""
        if not data:
            return b"" if self._applies() else None
        if not self._applies():
            return None
        framed = _frame(data)
        sent = self._server.send_now(framed)
        if sent <= 0:
            return None
        return framed[sent:]

    async def write_rest(self, rest: bytes) -> None:
        """Write what ``write_now`` left (shielded: part of the chunk is on the wire)."""
        await self._server.send_rest(rest)


def chunk_writer(send: Callable[..., Awaitable[None]]) -> ChunkWriter | None:
    """A writer of body chunks for the response ``send`` belongs to, or None.

    Call it after the response head was sent. None when ``send`` is not hypercorn's
    HTTP/1.1 stream on a :class:`DirectSendServer` sending a chunked body.
    """
    stream = getattr(send, "__self__", None)
    if type(stream) is not HTTPStream:
        return None
    protocol = getattr(stream.send, "__self__", None)
    if type(protocol) is not H11Protocol:
        return None
    server = getattr(protocol.send, "__self__", None)
    if not isinstance(server, DirectSendServer) or not server.direct:
        return None
    connection = protocol.connection
    if type(connection) is not h11.Connection \
            or type(getattr(connection, "_writer", None)) is not ChunkedWriter:
        return None
    return ChunkWriter(stream, connection, server)
