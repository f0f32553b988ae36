"""The upstream HTTP client: the only module that touches httpx.

Owns the upstream connection pools (shared by every key actor; keep-alive reuse) and the
translation of httpx exceptions into ``TransportFailure`` at this one boundary. Requests
go straight to an httpx transport (``workers.upstream_net.LeanTransport``, or the one a
test passes): the gateway needs none of ``httpx.AsyncClient``'s per-request machinery
(cookies, auth flows, redirects, URL merging). Imports nothing from the gateway but
``workers.failure`` and ``workers.upstream_net``.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import cast

import httpx

from workers.failure import LOCAL_RESOURCES, Failure, FailureClass, classify
from workers.upstream_http import BodyReader
from workers.upstream_net import LeanTransport
from workers.upstream_tls import upstream_tls_context


class TransportFailure(Exception):
    """The request never produced an HTTP response (connect error, timeout, reset)."""

    def __init__(self, failure: Failure, detail: str) -> None:
        super().__init__(detail)
        self.failure = failure


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: httpx.Headers
    _response: httpx.Response

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives; transport errors surface as ``TransportFailure``."""
        try:
            stream = cast(httpx.AsyncByteStream, self._response.stream)
            async with aclosing(cast(AsyncGenerator[bytes, None], stream.__aiter__())) as parts:
                async for chunk in parts:
                    if chunk:
                        yield chunk
        except httpx.HTTPError as exc:
            raise _failure_for(exc) from exc

    def direct_body(self) -> DirectBody | None:
        """The body for reading without waiting (``workers.pump``), or None when the
        transport cannot do that (a test's transport)."""
        direct = getattr(self._response.stream, "direct_reader", None)
        reader = direct() if direct is not None else None
        return DirectBody(reader) if reader is not None else None

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (or its first ``limit`` bytes)."""
        parts: list[bytes] = []
        size = 0
        async with aclosing(self.chunks()) as chunks:
            async for chunk in chunks:
                parts.append(chunk)
                size += len(chunk)
                if limit is not None and size >= limit:
                    break
        return b"".join(parts)


class DirectBody:
    """A response body read as its socket becomes readable, without waiting."""

    __slots__ = ("_reader", "fd")

    def __init__(self, reader: BodyReader) -> None:
        self._reader = reader
        self.fd = reader.fileno()

    @property
    def done(self) -> bool:
        return self._reader.done

    def read_now(self) -> bytes:
        """The body's next bytes, ``b""`` when there are none yet or it ended
        (``done``); transport errors surface as ``TransportFailure``."""
        try:
            return self._reader.read_now()
        except httpx.HTTPError as exc:
            raise _failure_for(exc) from exc


# This process ran out of something (open files, buffers, memory): not the upstream's
# fault, and another key would fail the same way.
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _local_exhaustion(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is this process running out of resources."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _LOCAL_ERRNOS:
            return True
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


def _failure_for(exc: httpx.HTTPError) -> TransportFailure:
    if _local_exhaustion(exc):
        local = Failure(kind=FailureClass.CONNECT, failover=False, affects_health=False,
                        retry_after_s=1.0, upstream_code=LOCAL_RESOURCES)
        return TransportFailure(local, "the gateway is out of sockets")
    timeout = isinstance(exc, httpx.TimeoutException)
    connect = isinstance(exc, httpx.ConnectError | httpx.RemoteProtocolError | httpx.ReadError)
    failure = classify(None, None, timeout=timeout, connect_error=connect or not timeout)
    # The message names the exception class only: URLs may carry secrets in query strings.
    return TransportFailure(failure, type(exc).__name__)


_URL_CACHE_SIZE = 1024
_HEADERS = {"content-type": "application/json", "accept-encoding": "identity",
            "user-agent": "airgate"}


class UpstreamClient:
    """A pool of HTTP connections to every provider, shared by all key actors."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the network (tests pass an ``httpx.MockTransport``).

        One pool for every provider (``workers.upstream_net.LeanTransport``): its cost
        per request does not grow with its connections, and light traffic reuses one
        connection.
        """
        self._pool = transport if transport is not None else LeanTransport(
            tls=upstream_tls_context(), max_connections=max_connections,
            connect_timeout_s=connect_timeout_s)
        self._urls: dict[str, httpx.URL] = {}

    async def aclose(self) -> None:
        await self._pool.aclose()

    def _url(self, url: str) -> httpx.URL:
        """Parsed once per distinct URL (a key's base URL and an endpoint path)."""
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= _URL_CACHE_SIZE:
                self._urls.clear()
            parsed = self._urls[url] = httpx.URL(url)
        return parsed

    @asynccontextmanager
    async def post(
        self, url: str, api_key: str, body: bytes
    ) -> AsyncIterator[UpstreamResponse]:
        """POST ``body`` and yield the response with its body unread (streamable).

        Timeouts for the first byte and idle gaps are the caller's cancel scopes; leaving
        the context (normally or by cancellation) closes the upstream connection's stream.
        """
        try:
            request = httpx.Request("POST", self._url(url), content=body,
                                    headers={**_HEADERS, "authorization": f"Bearer {api_key}"})
            response = await self._pool.handle_async_request(request)
        except httpx.HTTPError as exc:
            raise _failure_for(exc) from exc
        except ValueError as exc:  # a URL httpx cannot parse (set by an admin)
            raise _failure_for(httpx.UnsupportedProtocol(str(exc))) from exc
        try:
            yield UpstreamResponse(response.status_code, response.headers, response)
        finally:
            await response.aclose()
