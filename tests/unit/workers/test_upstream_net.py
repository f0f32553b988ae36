"""The lean upstream transport over real loopback sockets: bodies, keep-alive, errors.

The servers here are raw sockets, so each test says exactly what bytes the upstream sends."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable
from functools import partial
from typing import cast

import httpx
import pytest
import trio

from loadtest.self_signed import self_signed
from workers.upstream_http import Connection
from workers.upstream_net import LeanTransport
from workers.upstream_tls import Tls, upstream_tls_context

Handler = Callable[[trio.SocketStream], Awaitable[None]]


async def _serve(nursery: trio.Nursery, handler: Handler) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def _read_request(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        rest += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + rest


def _transport() -> LeanTransport:
    return LeanTransport(tls=ssl.create_default_context(), max_connections=4,
                         connect_timeout_s=2.0)


async def _post(transport: LeanTransport, port: int) -> httpx.Response:
    request = httpx.Request("POST", f"http://127.0.0.1:{port}/v1/x", content=b'{"a":1}')
    return await transport.handle_async_request(request)


async def _body(response: httpx.Response) -> bytes:
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    return b"".join([part async for part in stream])


async def test_streams_a_chunked_body_and_reuses_the_connection() -> None:
    connections = 0
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        for _ in range(2):
            seen.append(await _read_request(stream))
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                  b"transfer-encoding: chunked\r\n\r\n")
            for event in (b"data: 1\n\n", b"data: 2\n\n"):
                await stream.send_all(b"%x\r\n%s\r\n" % (len(event), event))
            await stream.send_all(b"0\r\n\r\n")

    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, handler)
        transport = _transport()
        for _ in range(2):
            response = await _post(transport, port)
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            assert await _body(response) == b"data: 1\n\ndata: 2\n\n"
            await response.aclose()
        await transport.aclose()
        nursery.cancel_scope.cancel()
    assert connections == 1  # keep-alive: both requests on one connection
    assert seen[0].endswith(b'{"a":1}')
    assert b"Content-Length: 7" in seen[0]


async def test_a_request_larger_than_the_socket_buffer_arrives_whole() -> None:
    """The first part goes straight into the socket, the rest through send_all."""
    body = bytes(range(256)) * 16_384  # 4 MiB, far more than a socket buffer takes
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep(0.1)  # a server slow to start reading: the buffers fill up
        seen.append(await _read_request(stream))
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    with trio.fail_after(5):  # a lost part would leave the server waiting for it
        await _post_large(handler, body)
    assert seen[0].partition(b"\r\n\r\n")[2] == body


async def _post_large(handler: Handler, body: bytes) -> None:
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, handler)
        transport = _transport()
        request = httpx.Request("POST", f"http://127.0.0.1:{port}/v1/x", content=body)
        response = await transport.handle_async_request(request)
        assert await _body(response) == b"ok"
        await transport.aclose()
        nursery.cancel_scope.cancel()


async def test_a_refused_connection_is_an_httpx_connect_error() -> None:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connections are refused
        with pytest.raises(httpx.ConnectError):
            await _post(_transport(), port)


async def test_a_body_cut_off_midway_is_an_httpx_error() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, handler)
        response = await _post(_transport(), port)
        with pytest.raises(httpx.HTTPError) as raised:
            await _body(response)
        assert isinstance(raised.value, httpx.RemoteProtocolError | httpx.ReadError)
        nursery.cancel_scope.cancel()


_OUT_OF_FILES = """
import os, resource, trio
from workers.upstream import TransportFailure, UpstreamClient

async def main() -> None:
    client = UpstreamClient(connect_timeout_s=5.0, max_connections=4)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    open_now = len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now, hard))  # not one more
    try:
        async with client.post("http://127.0.0.1:9/v1/chat/completions", "sk-x", b"{}"):
            print("connected?")
    except TransportFailure as exc:
        print(exc.failure.upstream_code, exc.failure.failover, exc.failure.affects_health)

trio.run(main)
"""


def test_a_process_out_of_files_is_told_apart_from_an_upstream_failure() -> None:
    """The real path: trio's connect fails with EMFILE, the transport wraps it, and the
    failure is the gateway's own (no failover, the key not blamed). In a child process,
    so the lowered limit on open files does not reach the test run."""
    done = subprocess.run([sys.executable, "-c", _OUT_OF_FILES], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["gateway_resources", "False", "False"]


async def _serve_script(handler: Handler, requests: int = 1) -> list[bytes]:
    """Run one request per entry in a fresh transport; return the bodies read."""
    bodies: list[bytes] = []
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, handler)
        transport = _transport()
        for _ in range(requests):
            response = await _post(transport, port)
            bodies.append(await _body(response))
            await response.aclose()
        await transport.aclose()
        nursery.cancel_scope.cancel()
    return bodies


@pytest.mark.parametrize(("wire", "body"), [
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5;ext=1\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\n", b"hello",
                 id="extension+trailer"),
    pytest.param(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                 b"ok", id="1xx skipped"),
    pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", b"", id="204 without a body"),
    pytest.param(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end", b"until the end",
                 id="body up to the close"),
])
async def test_response_framings(wire: bytes, body: bytes) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        for i in range(0, len(wire), 7):  # in small pieces: every boundary is crossed
            await stream.send_all(wire[i : i + 7])
        if b"close" in wire:
            await stream.aclose()
        else:
            await trio.sleep_forever()

    assert await _serve_script(handler) == [body]


@pytest.mark.parametrize("wire", [
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabXY",
    b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
    b"SMTP ready\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n bad header\r\n\r\n",
])
async def test_malformed_responses_are_protocol_errors(wire: bytes) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        await stream.send_all(wire)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, handler)
        transport = _transport()
        with pytest.raises(httpx.RemoteProtocolError):
            await _body(await _post(transport, port))
        await transport.aclose()
        nursery.cancel_scope.cancel()


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    connections = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        await _read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await stream.aclose()  # keep-alive offered, then the server closes it anyway

    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, handler)
        transport = _transport()
        for _ in range(3):
            response = await _post(transport, port)
            assert await _body(response) == b"ok"
            await response.aclose()
            await trio.sleep(0.05)  # the close reaches the idle connection
        await transport.aclose()
        nursery.cancel_scope.cancel()
    assert connections == 3


async def test_an_abandoned_body_closes_its_connection_and_frees_its_slot() -> None:
    connections = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        with trio.move_on_after(5):
            while True:
                await _read_request(stream)
                await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                      b"4\r\nmore\r\n")

    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, handler)
        transport = LeanTransport(tls=ssl.create_default_context(), max_connections=1,
                                  connect_timeout_s=2.0)
        for _ in range(2):  # one slot: the second waits for the first to be given back
            with trio.fail_after(2):
                response = await _post(transport, port)
                stream = response.stream
                assert isinstance(stream, httpx.AsyncByteStream)
                parts = cast(AsyncGenerator[bytes, None], stream.__aiter__())
                assert await parts.__anext__() == b"more"  # and no more read
                await response.aclose()
                await parts.aclose()
        await transport.aclose()
        nursery.cancel_scope.cancel()
    assert connections == 2  # a half-read body's connection is never reused


async def test_https_streams_and_reuses_the_tls_connection() -> None:
    server_tls, client_tls = self_signed()
    connections = 0

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        nonlocal connections
        connections += 1
        with trio.move_on_after(5):
            for _ in range(2):
                await _read_request(stream)  # type: ignore[arg-type]
                await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                      b"7\r\ndata: 1\r\n0\r\n\r\n")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(
            trio.serve_ssl_over_tcp, handler, 0, server_tls, host="127.0.0.1"))
        port = listeners[0].transport_listener.socket.getsockname()[1]
        transport = LeanTransport(tls=client_tls, max_connections=4, connect_timeout_s=2.0)
        for _ in range(2):
            request = httpx.Request("POST", f"https://localhost:{port}/v1/x", content=b"{}")
            response = await transport.handle_async_request(request)
            assert await _body(response) == b"data: 1"
            await response.aclose()
        # A server the client cannot verify is a connect error, not a response.
        untrusted = LeanTransport(tls=ssl.create_default_context(), max_connections=1,
                                  connect_timeout_s=2.0)
        with pytest.raises(httpx.ConnectError):
            await untrusted.handle_async_request(
                httpx.Request("POST", f"https://localhost:{port}/v1/x", content=b"{}"))
        await transport.aclose()
        nursery.cancel_scope.cancel()
    assert connections == 2  # one reused for both requests, one refused by the client


def test_the_upstream_context_checks_names_and_refuses_renegotiation() -> None:
    """A server's TLS 1.2 renegotiation mid-response would wait for an answer that a
    pumped connection sends only with its next request: refused outright instead."""
    context = upstream_tls_context()
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.options & ssl.OP_NO_RENEGOTIATION


class _AnsweringTls:
    """Stands in for ``Tls``: every read's record makes the connection owe the peer an
    answer (as a TLS 1.3 key update does); ``encrypt`` is the identity."""

    closed = False

    def __init__(self) -> None:
        self.owed = b""

    def decrypt(self, raw: bytes) -> bytes | None:
        self.owed += b"<answer>"
        return raw

    @property
    def to_send(self) -> bool:
        return bool(self.owed)

    def take_outgoing(self) -> bytes:
        owed, self.owed = self.owed, b""
        return owed

    def encrypt(self, data: bytes) -> bytes:
        return data


async def test_what_reading_tls_owes_the_peer_is_sent_at_once_or_before_the_next_request(
) -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    conn = Connection((b"https", b"localhost", 443),
                      trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
    conn.tls = cast(Tls, _AnsweringTls())
    theirs.send(b"record")
    assert conn.read_now() == b"record"
    assert theirs.recv(100) == b"<answer>"  # sent in the same call, no task involved
    # Our socket full: the answer waits, and leaves ahead of the next request's bytes.
    while True:
        try:
            ours.send(b"." * 65536)
        except BlockingIOError:
            break
    theirs.send(b"record")
    assert conn.read_now() == b"record"
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.write, b"REQUEST")
        while not received.endswith(b"REQUEST"):
            await trio.sleep(0.001)
            with contextlib.suppress(BlockingIOError):
                received += theirs.recv(1 << 20)
    assert received.lstrip(b".") == b"<answer>REQUEST"
    ours.close()
    theirs.close()
