"""A lean httpx transport for upstream calls: our own HTTP/1.1 keep-alive pool.

Owns :class:`LeanTransport` (an ``httpx.AsyncBaseTransport``). The gateway sends one
kind of request (a POST with a whole JSON body) to a few origins, and streams the answer
back. httpcore, which this replaced, paid for generality on every request: three
``trio.Lock``/``Event`` passes through the scheduler before the request was written
(pool, connection, state locks), an h11 state machine for every body event, and pool
bookkeeping that scans every connection per event (the reason the pool used to be
split in shards). Here a request takes a slot (no pass when one is free) and an idle
connection to its origin (the most recently used; O(1)), is written straight into the
socket, and its body is decoded by ``workers.upstream_http``.

Connections: at most ``max_connections`` requests in flight and as many connections
open; idle ones are kept (no expiry) and checked before reuse (one closed by the server
reads as readable). A reused connection that fails while the request is written is
dropped and the request is sent once on a fresh one (the server had closed it; nothing
was processed). Connect and TLS set-up have ``connect_timeout_s``; reads have no timeout
of their own (the gateway's cancel scopes bound first byte and idle time). TLS is
``workers.upstream_tls`` (over memory buffers, so ``workers.pump`` can read https bodies
too). Errors are httpx's, chained to their causes.

Imports nothing from the gateway but its own ``upstream_http`` and ``upstream_tls``.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import httpx
import trio

from workers.upstream_http import BodyReader, Connection, encode_request, read_head
from workers.upstream_tls import Tls

_PORTS = {b"http": 80, b"https": 443}


class _Body(httpx.AsyncByteStream):
    """A response body; the connection goes back to the pool when it is read to the
    end, and is closed when the body is abandoned."""

    __slots__ = ("_conn", "_pool", "_reader", "_released")

    def __init__(self, pool: LeanTransport, conn: Connection, reader: BodyReader) -> None:
        self._pool = pool
        self._conn = conn
        self._reader = reader
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reader = self._reader
        try:
            while (part := await reader.next()) is not None:
                yield part
        finally:
            self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            reader = self._reader
            self._pool.release(self._conn, reader.done and reader.reusable)

    async def aclose(self) -> None:
        self._release()

    def direct_reader(self) -> BodyReader | None:
        """The body's reader, for reading without waiting (``BodyReader.read_now``),
        when the body has not been iterated; else None."""
        reader = self._reader
        return reader if not self._released and reader.fileno() >= 0 else None


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive pool of ``max_connections`` (see the module docstring)."""

    def __init__(self, *, tls: ssl.SSLContext, max_connections: int,
                 connect_timeout_s: float) -> None:
        self._tls = tls
        self._connect_timeout_s = connect_timeout_s
        self._max = max_connections
        self._slots = trio.Semaphore(max_connections)
        self._idle: dict[tuple[bytes, bytes, int], list[Connection]] = {}
        self._open = 0
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.raw_scheme
        if scheme not in _PORTS:
            raise httpx.UnsupportedProtocol(f"unsupported scheme {scheme!r}")
        origin = (scheme, url.raw_host, url.port or _PORTS[scheme])
        data = encode_request(request)
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        conn: Connection | None = None
        try:
            conn = self._take_idle(origin)
            if conn is not None:
                try:
                    await conn.write(data)
                except httpx.WriteError:
                    self._discard(conn)  # closed by the server in the meantime
                    conn = None
            if conn is None:
                conn = await self._connect(origin)
                await conn.write(data)
            status, headers, keep = await read_head(conn)
            reader = BodyReader(conn, status, headers, keep)
        except BaseException:
            if conn is not None:
                self._discard(conn)
            self._slots.release()
            raise
        return httpx.Response(status, headers=headers, stream=_Body(self, conn, reader))

    def _take_idle(self, origin: tuple[bytes, bytes, int]) -> Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.dropped():
                return conn
            self._discard(conn)
        return None

    async def _connect(self, origin: tuple[bytes, bytes, int]) -> Connection:
        if self._open >= self._max:
            self._evict()
        scheme, host, port = origin
        name = host.decode("ascii")
        try:
            with trio.fail_after(self._connect_timeout_s):
                stream = await trio.open_tcp_stream(name, port)
                self._open += 1
                conn = Connection(origin, stream)
                if scheme == b"https":
                    conn.tls = Tls(self._tls, name)
                    try:
                        await conn.tls.handshake(stream)
                    except BaseException:
                        self._discard(conn)
                        raise
        except trio.TooSlowError as exc:
            raise httpx.ConnectTimeout("connect timed out") from exc
        except (OSError, ssl.SSLError, trio.BrokenResourceError) as exc:
            raise httpx.ConnectError(str(exc) or "connect failed") from exc
        return conn

    def _evict(self) -> None:
        """Close one idle connection (to any origin) to make room for a new one."""
        for idle in self._idle.values():
            if idle:
                self._discard(idle.pop(0))
                return

    def _discard(self, conn: Connection) -> None:
        conn.close()
        self._open -= 1

    def release(self, conn: Connection, reusable: bool) -> None:
        """A request is over: keep its connection for the next one, or close it."""
        if reusable and not self._closed:
            self._idle.setdefault(conn.origin, []).append(conn)
        else:
            self._discard(conn)
        self._slots.release()

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                self._discard(idle.pop())
