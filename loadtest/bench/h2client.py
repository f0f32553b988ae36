"""A small HTTP/2 (h2c, prior knowledge) client on trio for the stream generator.

Owns :class:`H2Conn`: one TCP connection carrying many concurrent requests, each of
which reads its response as a sequence of events from its own channel:
``("head", status)``, ``("data", bytes)``, then ``("end", None)``, or
``("reset", error code)`` / ``("closed", why)`` when the stream or connection dies.
Received data is acknowledged at once, so flow control never stalls a reader. Built
on the ``h2`` state machine (which hypercorn itself uses). Must not import ``proxy``,
``workers`` or ``store``.
"""

from __future__ import annotations

import math
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio

Event = tuple[str, Any]
_READ = 65536


class H2Conn:
    """One h2c connection; :meth:`request` starts a stream on it."""

    def __init__(self, stream: trio.SocketStream, max_streams: int) -> None:
        self._stream = stream
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self._send_lock = trio.Lock()
        self._streams: dict[int, trio.MemorySendChannel[Event]] = {}
        self.max_streams = max_streams
        self.active = 0  # streams started and not yet finished by their reader
        self.closed: str | None = None

    @property
    def has_room(self) -> bool:
        return self.closed is None and self.active < self.max_streams

    async def start(self, nursery: trio.Nursery) -> None:
        """Send the connection preface and start reading."""
        self._h2.initiate_connection()
        await self._flush()
        nursery.start_soon(self._read)

    async def request(self, headers: list[tuple[bytes, bytes]],
                      body: bytes) -> tuple[int, trio.MemoryReceiveChannel[Event]]:
        """Start a request: its stream id, and the channel its response's events arrive
        on. A stream the server would not take raises ``trio.BrokenResourceError``."""
        if self.closed is not None:
            raise trio.BrokenResourceError(self.closed)
        try:
            stream_id = self._h2.get_next_available_stream_id()
            send, receive = trio.open_memory_channel[Event](math.inf)
            self._h2.send_headers(stream_id, headers)
            self._h2.send_data(stream_id, body, end_stream=True)
        except h2.exceptions.H2Error as exc:
            raise trio.BrokenResourceError(f"h2 refused the stream: {exc!r}") from exc
        self._streams[stream_id] = send
        await self._flush()
        return stream_id, receive

    async def cancel(self, stream_id: int) -> None:
        """Reset a stream its reader gave up on (a timeout, an error body read in part), so
        that it no longer counts against the server's limit or fills its channel."""
        channel = self._streams.pop(stream_id, None)
        if channel is None:  # it ended, or the connection did: nothing to reset
            return
        channel.close()
        if self.closed is None:
            # Shielded: a reader that timed out is in a cancelled scope.
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    self._h2.reset_stream(stream_id)
                    await self._flush()
                except (h2.exceptions.H2Error, OSError, trio.BrokenResourceError,
                        trio.ClosedResourceError):
                    pass  # closed meanwhile

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._h2.data_to_send()
            if data:
                await self._stream.send_all(data)

    def _emit(self, stream_id: int, event: Event, *, last: bool = False) -> None:
        channel = self._streams.pop(stream_id, None) if last else self._streams.get(stream_id)
        if channel is not None:
            channel.send_nowait(event)
            if last:
                channel.close()

    async def _read(self) -> None:
        why = "connection closed by the server"
        try:
            while True:
                data = await self._stream.receive_some(_READ)
                if not data:
                    break
                for event in self._h2.receive_data(data):
                    self._dispatch(event)
                await self._flush()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                h2.exceptions.ProtocolError) as exc:
            why = f"connection error ({type(exc).__name__})"
        finally:
            self.closed = self.closed or why
            for stream_id in list(self._streams):
                self._emit(stream_id, ("closed", self.closed), last=True)

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            status = dict(event.headers or []).get(b":status", b"0")
            self._emit(event.stream_id, ("head", int(status)))
        elif isinstance(event, h2.events.DataReceived):
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self._emit(event.stream_id, ("data", event.data))
        elif isinstance(event, h2.events.StreamEnded):
            self._emit(event.stream_id, ("end", None), last=True)
        elif isinstance(event, h2.events.StreamReset):
            self._emit(event.stream_id, ("reset", event.error_code), last=True)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = f"GOAWAY ({event.error_code})"
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            limit = self._h2.remote_settings.max_concurrent_streams
            self.max_streams = min(self.max_streams, limit)

    async def aclose(self) -> None:
        self.closed = self.closed or "closed by the client"
        await self._stream.aclose()
