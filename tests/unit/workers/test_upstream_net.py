"""The lean upstream transport over real loopback sockets: bodies, keep-alive, errors."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from functools import partial

import httpcore
import httpx
import pytest
import trio

from workers.upstream_net import LeanTransport, to_httpx_error

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


def test_httpcore_exceptions_map_to_their_httpx_counterparts() -> None:
    assert isinstance(to_httpx_error(httpcore.ReadTimeout("x")), httpx.ReadTimeout)
    assert isinstance(to_httpx_error(httpcore.ConnectError("x")), httpx.ConnectError)
    assert isinstance(to_httpx_error(httpcore.RemoteProtocolError("x")),
                      httpx.RemoteProtocolError)
    assert to_httpx_error(ValueError("x")) is None


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
    """The real path: trio's connect fails with EMFILE, httpcore and httpx wrap it, and the
    failure is the gateway's own (no failover, the key not blamed). In a child process,
    so the lowered limit on open files does not reach the test run."""
    done = subprocess.run([sys.executable, "-c", _OUT_OF_FILES], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["gateway_resources", "False", "False"]
