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


def upstream_tls_context() -> ssl.SSLContext:
    """The system's trust store (``SSL_CERT_FILE`` adds a private CA), host names checked,
    and no TLS 1.2 renegotiation: a server asking for one mid-response would wait for an
    answer that a connection read by the pump sends only with its next request."""
    context = ssl.create_default_context()
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


class Tls:
    """One connection's TLS state: ``handshake`` once, then ``encrypt`` what is sent and
    ``decrypt`` what arrives. Errors are ``ssl.SSLError``."""

    __slots__ = ("_incoming", "_object", "_outgoing", "closed")

    def __init__(self, context: ssl.SSLContext, server_hostname: str) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        # The peer ended the connection (close_notify, or the end of the socket). Kept:
        # a close_notify that came in one read with data is seen then, and a server
        # that keeps its socket open while it waits for ours makes no further read.
        self.closed = False
        self._object = context.wrap_bio(self._incoming, self._outgoing,
                                        server_hostname=server_hostname)

    async def handshake(self, stream: trio.SocketStream) -> None:
        """Run the handshake over ``stream`` (certificate and host name checked)."""
        while True:
            try:
                self._object.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            if self._outgoing.pending:
                await stream.send_all(self._outgoing.read())
            if done:
                return
            data = await stream.receive_some(_READ)
            if not data:
                raise ssl.SSLEOFError("the server closed the connection during the handshake")
            self._incoming.write(data)

    def encrypt(self, data: bytes) -> bytes:
        """The bytes to send for ``data``."""
        self._object.write(data)
        return self._outgoing.read()

    def decrypt(self, raw: bytes) -> bytes | None:
        """All the plaintext that ``raw`` (what one read of the socket gave; ``b""``: the
        peer closed) completes: None when it completes none yet, ``b""`` at the end.
        After it, ``closed`` says whether the peer has ended, and ``to_send`` whether
        reading produced bytes to send back (a TLS 1.3 key update's answer)."""
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
                self.closed = True
                break
            if not data:
                self.closed = True
                break
            parts.append(data)
        if not parts:
            return b"" if self.closed else None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    @property
    def to_send(self) -> bool:
        return self._outgoing.pending > 0

    def take_outgoing(self) -> bytes:
        """The bytes reading produced to send back, taken."""
        return self._outgoing.read()
