"""Sending an upstream reply to the /v1 client: whole bodies, and streams as they come.

Owns :class:`ClientSink`, :class:`StreamOpener` and :func:`relay_reply`. The key actor
starts a stream with the request's ``StreamOpener`` as soon as the upstream answers: it
sends the head and hands the job a ``ClientSink``, and from then on writes each chunk
straight to the client (one task per chunk instead of two, and no pass through the
scheduler before the first byte). The request task stays behind to send ``: ping``
comments while the upstream is idle and the end of the body when the job ends. The sink
lets one writer at a time through, so a ping never lands inside a chunk.
"""

from __future__ import annotations

import trio

from proxy.asgi import Send
from proxy.asgi import send_response as send_whole
from proxy.direct_send import ChunkWriter, chunk_writer
from workers.dispatch import Reply
from workers.job import Started

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_PING = b": ping\n\n"


class ClientSink:
    """The client's end of one stream: body chunks, one writer at a time.

    Chunks go through ``direct`` (``proxy.direct_send.ChunkWriter``) when the server
    offers one and it still applies, else as ASGI messages. ``try_send`` is the key
    actor's way from ``workers.pump``'s task, which must not wait: it writes what the
    socket takes now and holds the rest for ``flush``.
    """

    __slots__ = ("_busy", "_direct", "_free", "_held", "_rest", "_send", "last")

    def __init__(self, send: Send, direct: ChunkWriter | None = None) -> None:
        self._send = send
        self._direct = direct
        self._busy = False
        self._free: trio.Event | None = None  # made only when a second writer must wait
        self._held: bytes | None = None  # try_send's data, none of it written yet
        self._rest: bytes | None = None  # try_send's framed chunk, partly written
        self.last = trio.current_time()  # when the client was last sent something

    async def send(self, data: bytes) -> None:
        while self._busy:
            if self._free is None:
                self._free = trio.Event()
            await self._free.wait()
        self._busy = True
        try:
            if self._direct is None or not await self._direct.write(data):
                await self._send({"type": "http.response.body", "body": data,
                                  "more_body": True})
        finally:
            self._release()

    @property
    def writes_now(self) -> bool:
        return self._direct is not None

    def try_send(self, data: bytes) -> bool:
        """Write ``data`` without waiting if the socket takes it all: True. Else False,
        and what did not go out is held: ``flush`` must be awaited before the next
        ``try_send`` or ``send`` of the same writer."""
        direct = self._direct
        if self._busy or direct is None:
            self._held = data
            return False
        rest = direct.write_now(data)
        if rest is None:
            self._held = data
            return False
        self.last = trio.current_time()
        if rest:
            self._busy = True  # the rest of the chunk must go before anyone else's bytes
            self._rest = rest
            return False
        return True

    async def flush(self) -> None:
        """Write what ``try_send`` held."""
        rest, self._rest = self._rest, None
        if rest is not None:
            assert self._direct is not None
            try:
                await self._direct.write_rest(rest)
            finally:
                self._release()
            return
        held, self._held = self._held, None
        if held is not None:
            await self.send(held)

    def _release(self) -> None:
        self._busy = False
        self.last = trio.current_time()
        if self._free is not None:
            self._free.set()
            self._free = None


class StreamOpener:
    """Sends a stream's head (status, SSE headers, the request id) and returns its sink."""

    __slots__ = ("_rid", "_send")

    def __init__(self, send: Send, rid: tuple[bytes, bytes]) -> None:
        self._send = send
        self._rid = rid

    async def __call__(self, started: Started) -> ClientSink:
        send = self._send
        await send({"type": "http.response.start", "status": started.status,
                    "headers": [*_SSE_HEADERS, self._rid]})
        return ClientSink(send, chunk_writer(send))


async def relay_reply(
    send: Send, reply: Reply, rid: tuple[bytes, bytes], done: list[bool], ping_s: float
) -> None:
    """Send the reply; ``done[0]`` is set just before its last byte is handed over."""
    started = reply.started
    if not reply.request.stream or started.status >= 400:
        body = b"".join([chunk async for chunk in reply.chunks()])
        headers = [(b"content-type", started.content_type.encode()), rid]
        done[0] = True
        await send_whole(send, started.status, body, headers)
        return
    job = reply.job
    if job.sink is None:  # the key actor had no opener: start the stream here
        # Hand the sink over and take what is queued in one step (no checkpoint between):
        # the key actor writes every later chunk straight to the client, and the sink
        # lets it through only after the queued bytes.
        job.sink = await StreamOpener(send, rid)(started)
    sink = job.sink
    assert isinstance(sink, ClientSink)  # the only sink /v1 hands out
    queued, ended = reply.take_queued()
    if queued:
        await sink.send(queued)
    while not ended:
        with trio.move_on_at(sink.last + ping_s) as idle:
            chunk = await reply.next_chunk()  # the end (or, defensively, stray bytes)
        if idle.cancelled_caught:
            if trio.current_time() >= sink.last + ping_s:
                await sink.send(_PING)
        elif chunk is None:
            ended = True
        else:
            await sink.send(chunk)
    done[0] = True
    await send({"type": "http.response.body", "body": b"", "more_body": False})
