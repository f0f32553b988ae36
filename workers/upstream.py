"""The upstream HTTP client: the only module that touches httpx.

Owns one shared ``httpx.AsyncClient`` (connection reuse across every key actor) and the
translation of httpx exceptions into ``TransportFailure`` at this one boundary.
Imports nothing from the gateway but ``workers.failure``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import cast

import httpx

from workers.failure import Failure, classify


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
            raw_iter = cast(AsyncGenerator[bytes, None], self._response.aiter_raw())
            async with aclosing(raw_iter) as raw:
                async for chunk in raw:
                    yield chunk
        except httpx.HTTPError as exc:
            raise _failure_for(exc) from exc

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


def _failure_for(exc: httpx.HTTPError) -> TransportFailure:
    timeout = isinstance(exc, httpx.TimeoutException)
    connect = isinstance(exc, httpx.ConnectError | httpx.RemoteProtocolError | httpx.ReadError)
    failure = classify(None, None, timeout=timeout, connect_error=connect or not timeout)
    # The message names the exception class only: URLs may carry secrets in query strings.
    return TransportFailure(failure, type(exc).__name__)


class UpstreamClient:
    """A pool of HTTP connections to every provider, shared by all key actors."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport`` replaces the network (tests pass an ``httpx.MockTransport``)."""
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(None, connect=connect_timeout_s),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    @asynccontextmanager
    async def post(
        self, url: str, api_key: str, body: bytes
    ) -> AsyncIterator[UpstreamResponse]:
        """POST ``body`` and yield the response with its body unread (streamable).

        Timeouts for the first byte and idle gaps are the caller's cancel scopes; leaving
        the context (normally or by cancellation) closes the upstream connection's stream.
        """
        request = self._client.build_request(
            "POST",
            url,
            content=body,
            headers={
                "authorization": f"Bearer {api_key}",
                "content-type": "application/json",
                "accept-encoding": "identity",
            },
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _failure_for(exc) from exc
        try:
            yield UpstreamResponse(response.status_code, response.headers, response)
        finally:
            await response.aclose()
