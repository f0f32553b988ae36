"""A lean httpx transport for upstream calls: httpcore's pool over a cheaper trio backend.

Owns :class:`LeanTransport` (an ``httpx.AsyncBaseTransport``) and the trio network
backend under it. httpcore's own trio backend wraps every socket read in an exception-
mapping context manager and a ``fail_after`` cancel scope, even with no timeout; a
streamed completion does one read per SSE burst, and loadtest/bench's profile showed
those two costing ~6 % of the gateway's CPU on realistic streams. Here a read is the
bare ``receive_some`` inside one ``try`` (the gateway's own cancel scopes bound first
byte and idle time), and a response body is iterated without httpx's extra generator
layers. A write on a plain connection is offered to the socket first and is done
without yielding when the socket takes it all. Connect and TLS set-up keep their
timeouts. httpcore's exceptions become httpx's, so callers see one exception family
whichever transport they are given. (The methods take ``timeout`` arguments because
httpcore's backend interface does.)

Imports nothing from the gateway.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpcore
import httpx
import trio

# Most specific first: isinstance picks the first match.
_EXCEPTIONS: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


def to_httpx_error(exc: Exception) -> httpx.HTTPError | None:
    """httpx's counterpart of an httpcore exception (None if it is not one)."""
    for core, ours in _EXCEPTIONS:
        if isinstance(exc, core):
            return ours(str(exc) or type(exc).__name__)
    return None


class _TrioStream(httpcore.AsyncNetworkStream):
    __slots__ = ("_stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        try:
            if timeout is None:
                data = await self._stream.receive_some(max_bytes)
            else:
                with trio.fail_after(timeout):
                    data = await self._stream.receive_some(max_bytes)
        except trio.TooSlowError as exc:
            raise httpcore.ReadTimeout("read timed out") from exc
        except _BROKEN as exc:
            raise httpcore.ReadError(str(exc) or "connection broken") from exc
        return data if type(data) is bytes else bytes(data)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        stream = self._stream
        if type(stream) is trio.SocketStream:
            # A request usually fits the socket's buffer: written at once, without the
            # pass through the scheduler that send_all makes. fileno() is -1 once closed.
            try:
                sent = os.write(stream.socket.fileno(), buffer)
            except OSError:  # a full buffer, or a dead socket that send_all reports
                sent = 0
            if sent == len(buffer):
                return
            buffer = buffer[sent:]
        try:
            if timeout is None:
                await self._stream.send_all(buffer)
                return
            with trio.fail_after(timeout):
                await self._stream.send_all(buffer)
        except trio.TooSlowError as exc:
            raise httpcore.WriteTimeout("write timed out") from exc
        except _BROKEN as exc:
            raise httpcore.WriteError(str(exc) or "connection broken") from exc

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> httpcore.AsyncNetworkStream:
        tls = trio.SSLStream(self._stream, ssl_context, server_hostname=server_hostname,
                             https_compatible=True)
        try:
            with trio.fail_after(_inf(timeout)):
                await tls.do_handshake()
        except trio.TooSlowError as exc:
            await self.aclose()
            raise httpcore.ConnectTimeout("TLS handshake timed out") from exc
        except (*_BROKEN, ssl.SSLError) as exc:
            await self.aclose()
            raise httpcore.ConnectError(str(exc) or "TLS handshake failed") from exc
        return _TrioStream(tls)

    def get_extra_info(self, info: str) -> Any:
        stream = self._stream
        if info == "ssl_object":
            return stream._ssl_object if isinstance(stream, trio.SSLStream) else None
        while isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if not isinstance(stream, trio.SocketStream):
            return None
        if info == "socket":
            return stream.socket
        if info == "is_readable":
            return stream.socket.is_readable()  # httpcore's check for a dropped keep-alive
        if info == "client_addr":
            return stream.socket.getsockname()
        if info == "server_addr":
            return stream.socket.getpeername()
        return None


def _inf(timeout: float | None) -> float:
    return float("inf") if timeout is None else timeout


class _TrioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with trio.fail_after(_inf(timeout)):
                stream = await trio.open_tcp_stream(host, port, local_address=local_address)
        except trio.TooSlowError as exc:
            raise httpcore.ConnectTimeout("connect timed out") from exc
        except (OSError, *_BROKEN) as exc:
            raise httpcore.ConnectError(str(exc) or "connect failed") from exc
        for option in socket_options or ():
            stream.setsockopt(*option)
        return _TrioStream(stream)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.UnsupportedProtocol("unix sockets are not used for upstreams")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class _Body(httpx.AsyncByteStream):
    """A response body straight from httpcore, its errors turned into httpx's."""

    __slots__ = ("_stream",)

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except Exception as exc:
            mapped = to_httpx_error(exc)
            if mapped is None:
                raise
            raise mapped from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


class LeanTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive pool of ``max_connections`` over the lean trio backend."""

    def __init__(self, *, tls: ssl.SSLContext, max_connections: int,
                 connect_timeout_s: float) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=tls, max_connections=max_connections,
            max_keepalive_connections=max_connections, network_backend=_TrioBackend(),
        )
        self._timeouts = {"connect": connect_timeout_s, "read": None, "write": None,
                          "pool": None}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        core = httpcore.Request(
            request.method,
            httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port,
                         target=url.raw_path),
            headers=request.headers.raw,
            content=request.content,
            extensions={"timeout": self._timeouts},
        )
        try:
            response = await self._pool.handle_async_request(core)
        except Exception as exc:
            mapped = to_httpx_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        return httpx.Response(response.status, headers=response.headers,
                              stream=_Body(response.stream), extensions=response.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()
