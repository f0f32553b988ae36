"""One upstream HTTP/1.1 connection: writing a request, reading a response head, and
decoding its body as it arrives.

Owns :class:`Connection`, :func:`encode_request`, :func:`read_head` and
:class:`BodyReader`. Only what a client of OpenAI-compatible providers needs: requests
with a whole body; responses framed by ``content-length``, ``transfer-encoding:
chunked`` or the end of the connection; ``1xx`` heads skipped. Errors are httpx's
(``RemoteProtocolError``, ``ReadError``, ``WriteError``), each chained to its cause.
TLS is ``workers.upstream_tls``: the socket is always read here, then decrypted.

Imports nothing from the gateway but ``upstream_tls``.
"""

from __future__ import annotations

import os
import ssl

import httpx
import trio

from workers.upstream_tls import Tls

Headers = list[tuple[bytes, bytes]]

_READ = 65536
_MAX_HEAD = 64 * 1024  # a response head larger than this is refused
_MAX_LINE = 4096  # a chunk-size or trailer line
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Connection:
    """A connected socket, its TLS when the origin is https, and the bytes read past the
    last response."""

    __slots__ = ("_drained", "_unsent", "buffer", "origin", "stream", "tls")

    def __init__(self, origin: tuple[bytes, bytes, int], stream: trio.SocketStream,
                 tls: Tls | None = None) -> None:
        self.origin = origin
        self.stream = stream
        self.tls = tls
        self.buffer = bytearray()
        self._unsent = b""  # TLS bytes that reading produced and the socket did not take
        # The last read took all there was: the next waits for more before reading.
        # (A response never follows its request at once, so a new connection starts so.)
        self._drained = True

    async def write(self, data: bytes) -> None:
        """Send ``data``: straight into the socket when it takes it all (no pass through
        the scheduler), the rest through ``send_all``."""
        stream = self.stream
        try:
            if self.tls is not None:
                data = self._unsent + self.tls.encrypt(data)
                self._unsent = b""
            try:
                sent = os.write(stream.socket.fileno(), data)  # -1 once closed
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            await stream.send_all(data[sent:])
        except (*_BROKEN, ssl.SSLError) as exc:
            raise httpx.WriteError(str(exc) or type(exc).__name__) from exc

    async def read(self) -> bytes:
        """What arrives next (``b""``: the peer closed). With one system call per arrival
        where trio's ``receive_some`` makes two (a read that finds nothing, then the one
        after the wait) through several wrappers: when the last read emptied the socket,
        wait for it first. A read that did not wait yields once, as trio's would, so
        that a fast upstream cannot keep the loop to itself."""
        if self.ended:
            await trio.lowlevel.checkpoint()
            return b""
        sock = self.stream.socket
        waited = False
        try:
            if self._drained:
                await trio.lowlevel.wait_readable(sock)
                waited = True
            while (data := self.read_now()) is None:
                await trio.lowlevel.wait_readable(sock)
                waited = True
        except _BROKEN as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        if not waited:
            await trio.lowlevel.checkpoint()
        return data

    def fileno(self) -> int:
        """The socket to wait on for ``read_now`` (-1 once closed)."""
        return self.stream.socket.fileno()

    @property
    def ended(self) -> bool:
        """The peer ended TLS (in a read that may also have brought data): there is
        nothing more to read, whether or not the socket is still open."""
        return self.tls is not None and self.tls.closed

    def read_now(self) -> bytes | None:
        """One read of the socket, without waiting: what arrived, decrypted (``b""`` when
        the peer closed), or None when nothing has (or, with TLS, nothing whole yet)."""
        if self.ended:
            return b""
        try:
            # fileno() is -1 once the socket is closed: EBADF, never someone else's fd.
            data = os.read(self.fileno(), _READ)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        self._drained = len(data) < _READ
        tls = self.tls
        if tls is None:
            return data
        try:
            plain = tls.decrypt(data)
        except ssl.SSLError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        if tls.to_send:
            self._send_now(tls.take_outgoing())
        return plain

    def _send_now(self, data: bytes) -> None:
        """What the socket takes of ``data`` now; the rest goes before the next write."""
        data = self._unsent + data
        try:
            sent = os.write(self.fileno(), data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # a broken connection: the next read or write says so
        self._unsent = data[sent:]

    def dropped(self) -> bool:
        """Whether an idle connection was closed by the server (or sent something
        unasked): readable while idle means it cannot carry another request."""
        if self.ended:
            return True
        try:
            return self.stream.socket.is_readable()
        except OSError:
            return True

    def close(self) -> None:
        """Close at once, without a TLS goodbye (the connection is being abandoned)."""
        self.stream.socket.close()


def encode_request(request: httpx.Request) -> bytes:
    """The request's bytes: line, headers (httpx added ``Host`` and ``Content-Length``)
    and the whole body."""
    lines = [b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)]
    lines += [name + b": " + value for name, value in request.headers.raw]
    return b"\r\n".join(lines) + b"\r\n\r\n" + request.content


async def read_head(conn: Connection) -> tuple[int, Headers, bool]:
    """The final response head: (status, headers, whether the connection may carry
    another request once the body is read). ``1xx`` heads are skipped."""
    while True:
        buffer = conn.buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > _MAX_HEAD:
                raise httpx.RemoteProtocolError("response head too large")
            data = await conn.read()
            if not data:
                raise httpx.RemoteProtocolError(
                    "Server disconnected without sending a response.")
            buffer += data
        lines = bytes(buffer[:end]).split(b"\r\n")
        del buffer[: end + 4]
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or not code.isdigit():
            raise httpx.RemoteProtocolError("malformed response status line")
        status = int(code)
        headers: Headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise httpx.RemoteProtocolError("malformed response header")
            headers.append((name, value.strip()))
        if 100 <= status < 200 and status != 101:
            continue
        keep = version == b"HTTP/1.1" and not any(
            n.lower() == b"connection" and b"close" in v.lower() for n, v in headers)
        return status, headers, keep


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class BodyReader:
    """A response body, decoded as it arrives (``content-length``, chunked, or up to
    the end of the connection). ``reusable`` says, once ``done``, whether the connection
    ended exactly at the body's end and may carry the next request."""

    __slots__ = ("_chunked", "_conn", "_left", "_state", "done", "reusable")

    def __init__(self, conn: Connection, status: int, headers: Headers, keep: bool) -> None:
        self._conn = conn
        self._chunked = False
        self._left = -1  # bytes of the body (or of the current chunk) still to come
        self._state = _DATA
        self.done = False
        self.reusable = keep
        length: bytes | None = None
        for name, value in headers:
            lower = name.lower()
            if lower == b"transfer-encoding":
                self._chunked = value.lower().endswith(b"chunked")
            elif lower == b"content-length":
                length = value
        if status in (204, 304):
            self._left = 0
        elif self._chunked:
            self._state = _SIZE
        elif length is not None:
            if not length.isdigit():
                raise httpx.RemoteProtocolError("malformed content-length")
            self._left = int(length)
        else:
            self.reusable = False  # the body ends with the connection

    async def next(self) -> bytes | None:
        """The body's next bytes (never empty), or None at its end."""
        while True:
            part = self._take()
            if part:
                return part
            if self.done:
                return None
            data = await self._conn.read()
            if not data:
                self._connection_ended()
                return None
            self._conn.buffer += data

    def fileno(self) -> int:
        """The socket to wait on for ``read_now`` (-1 once closed)."""
        return self._conn.fileno()

    def read_now(self) -> bytes:
        """``next`` without waiting, for a socket that is readable: the body's
        next bytes, or ``b""`` when none are complete yet or the body has ended (see
        ``done``). At most one system call."""
        part = self._take()
        if part or self.done:
            return part
        conn = self._conn
        data = conn.read_now()
        if data is None:
            return b""
        if not data:
            self._connection_ended()
            return b""
        conn.buffer += data
        part = self._take()
        if conn.ended and not self.done:
            # The peer ended TLS in the read that brought these bytes: no readiness
            # will come for the end, so it is taken now (an error for a cut body).
            self._connection_ended()
        return part

    def _connection_ended(self) -> None:
        """The peer closed: the end of a body that runs up to it, else an error."""
        if self._left < 0 and not self._chunked:
            self.done = True
            return
        raise httpx.RemoteProtocolError(
            "peer closed connection without sending complete message body")

    def _take(self) -> bytes:
        """What the buffer holds of the body, consumed; marks the end when reached."""
        buffer = self._conn.buffer
        if not self._chunked:
            if self._left < 0:  # up to the end of the connection
                part = bytes(buffer)
                buffer.clear()
                return part
            part = bytes(buffer[: self._left])
            del buffer[: len(part)]
            self._left -= len(part)
            if self._left == 0:
                self._finish()
            return part
        parts: list[bytes] = []
        while True:
            state = self._state
            if state == _DATA:
                if not buffer:
                    break
                part = bytes(buffer[: self._left])
                del buffer[: len(part)]
                parts.append(part)
                self._left -= len(part)
                if self._left == 0:
                    self._state = _DATA_END
            elif state == _DATA_END:
                if len(buffer) < 2:
                    break
                if buffer[:2] != b"\r\n":
                    raise httpx.RemoteProtocolError("malformed chunked body")
                del buffer[:2]
                self._state = _SIZE
            elif state == _DONE:
                break
            else:  # a chunk-size line, or a trailer line after the last chunk
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > _MAX_LINE:
                        raise httpx.RemoteProtocolError("malformed chunked body")
                    break
                line = bytes(buffer[:end])
                del buffer[: end + 2]
                if state == _TRAILER:
                    if not line:
                        self._finish()
                    continue
                digits = line.partition(b";")[0].strip()
                try:
                    self._left = int(digits, 16)
                except ValueError:
                    raise httpx.RemoteProtocolError("malformed chunk size") from None
                if self._left < 0:
                    raise httpx.RemoteProtocolError("malformed chunk size")
                self._state = _DATA if self._left else _TRAILER
        return b"".join(parts)

    def _finish(self) -> None:
        self.done = True
        self._state = _DONE
        if self._conn.buffer:  # bytes past the response: not a connection to reuse
            self.reusable = False
