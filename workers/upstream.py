"""The upstream HTTP client: the only module that touches httpx.

Owns one shared ``httpx.AsyncClient`` (connection reuse across every key actor) and the
translation of httpx exceptions into ``TransportFailure`` at this one boundary.
Imports nothing from the gateway but ``workers.failure``.
"""

from __future__ import annotations

import ssl
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


_CONNECTIONS_PER_SHARD = 16


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

        The connections are split over several small httpx clients, used in turn: the
        cost of httpcore's pool bookkeeping grows with the connections in one pool (each
        request and each response event scans them), which made one big shared pool the
        bottleneck at a hundred concurrent streams (loadtest/bench measured ~15 CPU-ms
        per request). Keep-alive reuse still works within each client.
        """
        shards = max(1, -(-max_connections // _CONNECTIONS_PER_SHARD))
        per_shard = -(-max_connections // shards)
        # One TLS context for all (building one loads the CA bundle: ~10 ms), and the
        # clients are made on first use, so an idle gateway holds one.
        tls = ssl.create_default_context()

        def make() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                transport=transport,
                verify=tls,
                timeout=httpx.Timeout(None, connect=connect_timeout_s),
                limits=httpx.Limits(max_connections=per_shard,
                                    max_keepalive_connections=per_shard),
                follow_redirects=False,
            )

        self._make = make
        self._clients: list[httpx.AsyncClient | None] = [None] * shards
        self._next = 0

    async def aclose(self) -> None:
        for client in self._clients:
            if client is not None:
                await client.aclose()

    def _client(self) -> httpx.AsyncClient:
        self._next = (self._next + 1) % len(self._clients)
        client = self._clients[self._next]
        if client is None:
            client = self._clients[self._next] = self._make()
        return client

    @asynccontextmanager
    async def post(
        self, url: str, api_key: str, body: bytes
    ) -> AsyncIterator[UpstreamResponse]:
        """POST ``body`` and yield the response with its body unread (streamable).

        Timeouts for the first byte and idle gaps are the caller's cancel scopes; leaving
        the context (normally or by cancellation) closes the upstream connection's stream.
        """
        client = self._client()
        request = client.build_request(
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
            response = await client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise _failure_for(exc) from exc
        try:
            yield UpstreamResponse(response.status_code, response.headers, response)
        finally:
            await response.aclose()
