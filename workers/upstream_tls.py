"""TLS for upstream connections, over memory buffers instead of trio's ``SSLStream``.

Owns :class:`Tls`. The connection reads the socket itself (``Connection.read_now``: one
system call, no wait) and hands what arrived to :meth:`Tls.decrypt`, which returns all the
plaintext those bytes complete. Nothing decrypted is ever left inside the ``SSLObject``,
so a socket that is no longer readable means there is nothing more to read. That is what
lets ``workers.pump`` read TLS upstreams as it reads plain ones: trio's ``SSLStream``
can only be read by a task waiting in ``receive_some``.

An end of the connection without TLS's ``close_notify`` counts as an end, as trio's
``SSLStream(https_compatible=True)`` and browsers count it: HTTP's own framing tells a
complete body from a cut one (``upstream_http.BodyReader``).

Imports nothing from the gateway.
"""

from __future__ import annotations

import ssl

import trio

_READ = 65536


class Tls:
    """One connection's TLS state: ``handshake`` once, then ``encrypt`` what is sent and
    ``decrypt`` what arrives. Errors are ``ssl.SSLError``."""

    __slots__ = ("_incoming", "_object", "_outgoing")

    def __init__(self, context: ssl.SSLContext, server_hostname: str) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._object = context.wrap_bio(self._incoming, self._outgoing,
                                        server_hostname=server_hostname)

    async def handshake(self, stream: trio.SocketStream) -> None:
        """Run the handshake over ``stream`` (certificate and host name checked)."""
        while True:
            try:
                self._object.do_handshake()
            except ssl.SSLWantReadError:
                pass
            else:
                if self._outgoing.pending:
                    await stream.send_all(self._outgoing.read())
                return
            if self._outgoing.pending:
                await stream.send_all(self._outgoing.read())
            data = await stream.receive_some(_READ)
            if not data:
                raise ssl.SSLEOFError("the server closed the connection during the handshake")
            self._incoming.write(data)

    def encrypt(self, data: bytes) -> bytes:
        """The bytes to send for ``data``, after any the last ``decrypt`` left to send
        (a TLS 1.3 key update's answer)."""
        self._object.write(data)
        return self._outgoing.read()

    def decrypt(self, raw: bytes) -> bytes | None:
        """All the plaintext that ``raw`` (what one read of the socket gave; ``b""``: the
        peer closed) completes: None when it completes none yet, ``b""`` at the end."""
        if raw:
            self._incoming.write(raw)
        else:
            self._incoming.write_eof()
        parts: list[bytes] = []
        while True:
            try:
                data = self._object.read(_READ)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b"".join(parts)  # the end (it comes again on the next read)
            if not data:
                return b"".join(parts)
            parts.append(data)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else b"".join(parts)
