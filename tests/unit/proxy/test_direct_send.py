"""Direct writes to the client (proxy.direct_send) on a real hypercorn server on loopback.

The client side is raw sockets parsed with h11, so the framing the server wrote is
checked byte for byte, and the tests control how fast the client reads.
"""

from __future__ import annotations

import hashlib
import socket
from typing import Any

import h11
import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.events import RawData
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer

from proxy.direct_send import DirectSendServer, chunk_writer, queue_at_once
from tests.http1 import fetch, read_response, serving


def client_connection() -> h11.Connection:
    return h11.Connection(h11.CLIENT)


async def send_request(stream: trio.SocketStream, conn: h11.Connection, path: str) -> None:
    await stream.send_all(conn.send(h11.Request(method="GET", target=path,
                                                headers=[("host", "t")])))
    await stream.send_all(conn.send(h11.EndOfMessage()))


def payload(n: int, size: int) -> list[bytes]:
    return [bytes([65 + i % 26]) * size + f"|{i}\n".encode() for i in range(n)]


async def test_a_streamed_body_is_framed_in_order_and_the_connection_is_reused() -> None:
    writers: list[bool] = []
    chunks = payload(50, 100)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/whole":
            body = b"whole body"
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        write = chunk_writer(send)
        writers.append(write is not None)
        assert write is not None
        for chunk in chunks:
            assert await write.write(chunk)
        assert await write.write(b"")  # nothing to write, and no end-of-body marker
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async with serving(app) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = client_connection()
        for path in ("/stream", "/whole", "/stream"):
            await send_request(stream, conn, path)
            head, body = await read_response(stream, conn)
            assert head.status_code == 200
            assert body == (b"whole body" if path == "/whole" else b"".join(chunks))
            conn.start_next_cycle()  # keep-alive: the same connection serves the next
        await stream.aclose()
    assert writers == [True, True]


async def test_a_full_socket_buffer_hands_the_rest_to_hypercorn_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow reader and a small send buffer: most writes go in part or not at all, and
    what the kernel did not take goes hypercorn's way, after what it did take."""
    handed: list[int] = []
    original = TCPServer.protocol_send

    async def counting(self: TCPServer, event: Any) -> None:
        handed.append(len(getattr(event, "data", b"")))
        await original(self, event)

    monkeypatch.setattr(TCPServer, "protocol_send", counting)
    chunks = payload(400, 10_000)  # ~4 MB

    async def app(scope: Any, receive: Any, send: Any) -> None:
        server = send.__self__.send.__self__.send.__self__
        assert isinstance(server, DirectSendServer)
        server.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        write = chunk_writer(send)
        assert write is not None
        for chunk in chunks:
            assert await write.write(chunk)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async with serving(app) as port:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        conn = client_connection()
        await send_request(stream, conn, "/big")
        _, body = await read_response(stream, conn, pause_s=0.2, read_size=4096)
        await stream.aclose()
    assert hashlib.sha256(body).digest() == hashlib.sha256(b"".join(chunks)).digest()
    assert sum(1 for size in handed if size) > 10  # the fallback was really taken


async def test_a_client_that_leaves_mid_stream_ends_the_writer_not_the_server() -> None:
    outcome: dict[str, Any] = {}
    ended = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/ping":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"4")]})
            await send({"type": "http.response.body", "body": b"pong"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        write = chunk_writer(send)
        assert write is not None
        with trio.move_on_after(10) as timeout:
            sent = 0
            while await write.write(b"x" * 1000 + b"\n"):
                sent += 1
                await trio.sleep(0.005)
        outcome["sent"] = sent
        outcome["timed_out"] = timeout.cancelled_caught
        ended.set()
        # After the writer gives up, ASGI sends are what hypercorn ignores or ends.
        await send({"type": "http.response.body", "body": b"late", "more_body": True})

    async with serving(app) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = client_connection()
        await send_request(stream, conn, "/stream")
        first = await stream.receive_some(4096)
        assert first.startswith(b"HTTP/1.1 200")
        await stream.aclose()  # the client leaves mid-stream
        with trio.fail_after(5):
            await ended.wait()
        head, body = await fetch(port, "/ping")  # the server still serves new connections
    assert outcome["timed_out"] is False
    assert outcome["sent"] >= 1
    assert (head.status_code, body) == (200, b"pong")


async def test_a_writer_kept_past_the_end_of_its_connection_writes_nothing() -> None:
    """A stream's relay can end after its connection did (the pump hands it back, the
    task runs later): the connection's objects are unlinked then
    (``DirectSendServer.run``), and every way of writing is a no-op, not an error."""
    kept: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        writer = chunk_writer(send)
        assert writer is not None
        assert await writer.write(b"first")
        kept.append(writer)
        while (await receive())["type"] != "http.disconnect":
            pass

    async with serving(app) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await send_request(stream, client_connection(), "/stream")
        assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")
        await stream.aclose()
        for _ in range(500):  # the server's side of the connection ends
            if kept and kept[0]._server.ended:
                break
            await trio.sleep(0.01)
        writer = kept[0]
        assert writer._server.ended
        assert writer.write_now(b"late") is None
        assert await writer.write(b"late") is False
        await writer.write_rest(b"late")  # the rest of a chunk: dropped, no error
        server = writer._server
        assert server.send_now(b"late") == -1
        await server.send_bytes(b"late")
        await server.protocol_send(RawData(data=b"late"))


async def test_a_write_under_way_when_its_connection_ends_finishes_without_error() -> None:
    """A relay (in a task of its own, as the key actor's) is blocked writing to a client
    that stopped reading; the client half-closes and the connection ends meanwhile. The
    write fails as a write to a gone client does, never on the ended server's state
    (about half of these raised AttributeError when ending cleared the server)."""
    outcomes: list[str] = []

    async def relay(writer: Any) -> None:
        try:
            await writer.write(b"x" * (16 << 20))
            outcomes.append("ended")
        except Exception as exc:  # what escaped: the test reports it
            outcomes.append(repr(exc))

    async def clients(port: int) -> None:
        for _ in range(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await send_request(stream, client_connection(), "/stream")
            await trio.sleep(0.05)  # the relay is blocked in hypercorn's send_all
            await stream.send_eof()  # the client half-closes, never reading
            await trio.sleep(0.05)
            await stream.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as relays:  # left once every relay has ended
            async def app(scope: Any, receive: Any, send: Any) -> None:
                await send({"type": "http.response.start", "status": 200, "headers": []})
                writer = chunk_writer(send)
                assert writer is not None
                relays.start_soon(relay, writer)
                while (await receive())["type"] != "http.disconnect":
                    pass

            async with serving(app) as port:
                await clients(port)
    assert outcomes == ["ended"] * 10


async def test_no_writer_without_direct_send_or_outside_hypercorn() -> None:
    found: list[object] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        found.append(chunk_writer(send))
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})

    async with serving(app, direct=False) as port:
        _, body = await fetch(port)
    assert found == [None]
    assert body == b"ok"

    async def plain_send(message: Any) -> None:
        pass

    assert chunk_writer(plain_send) is None


async def test_a_content_length_body_gets_no_chunk_writer() -> None:
    found: list[object] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        found.append(chunk_writer(send))
        await send({"type": "http.response.body", "body": b"ok"})

    async with serving(app) as port:
        _, body = await fetch(port)
    assert found == [None]
    assert body == b"ok"


async def _ok_after(delay_s: float, scope: Any, receive: Any, send: Any) -> None:
    await trio.sleep(delay_s)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _closed_by_server(stream: trio.SocketStream) -> float:
    """Seconds until the server closes the connection."""
    started = trio.current_time()
    assert await stream.receive_some(1) == b""
    return trio.current_time() - started


@pytest.mark.parametrize("direct", [True, False])
async def test_an_idle_connection_closes_after_the_keep_alive_timeout(direct: bool) -> None:
    """The same keep-alive behaviour with direct sends' single watcher task per
    connection as with hypercorn's timer task per request; a request that takes longer
    than the timeout is not cut short."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _ok_after(0.6 if scope["path"] == "/slow" else 0.0, scope, receive, send)

    async with serving(app, direct=direct, keep_alive_timeout=0.3) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = client_connection()
        for path in ("/", "/slow", "/"):  # /slow outlasts the timeout
            await send_request(stream, conn, path)
            head, body = await read_response(stream, conn)
            assert (head.status_code, body) == (200, b"ok")
            conn.start_next_cycle()
            await trio.sleep(0.15)  # idle for half the timeout: still open
        with trio.fail_after(3):
            idle_for = await _closed_by_server(stream)
        await stream.aclose()
    assert 0.05 <= idle_for <= 1.0  # ~0.3 s after the last answer, minus the 0.15 waited


@pytest.mark.parametrize("direct", [True, False])
async def test_shutdown_closes_idle_connections_at_once(direct: bool) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _ok_after(0.0, scope, receive, send)

    stop = trio.Event()
    async with serving(app, direct=direct, stop=stop, keep_alive_timeout=30,
                       graceful_timeout=10) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = client_connection()
        await send_request(stream, conn, "/")
        await read_response(stream, conn)
        stop.set()
        with trio.fail_after(3):
            await _closed_by_server(stream)
        await stream.aclose()



async def test_request_messages_are_queued_for_the_app_without_a_pass() -> None:
    """hypercorn queues a body and its end with ``send``, which yields after each: the
    app, started in between, found the body without its end and waited a pass."""
    received: list[Any] = []
    started = trio.Event()

    async def app(scope: Any, receive: Any, send: Any, *_: Any) -> None:
        started.set()
        received.append(await receive())
        received.append(await receive())

    async with TaskGroup() as group:
        queue_at_once(group)
        put = await group.spawn_app(app, Config(), {}, _ignore)
        with trio.testing.assert_no_checkpoints():
            await put({"type": "http.request", "body": b"x", "more_body": True})
            await put({"type": "http.request", "body": b"", "more_body": False})
        await started.wait()
    assert [m["more_body"] for m in received] == [True, False]

    async with TaskGroup() as group:  # hypercorn's own: a checkpoint per message
        put = await group.spawn_app(app, Config(), {}, _ignore)
        with pytest.raises(AssertionError), trio.testing.assert_no_checkpoints():
            await put({"type": "http.request", "body": b"x", "more_body": True})
        await put({"type": "http.request", "body": b"", "more_body": False})


async def test_a_full_app_queue_is_still_waited_on() -> None:
    release = trio.Event()
    received: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any, *_: Any) -> None:
        await release.wait()
        for _ in range(12):
            received.append(await receive())

    config = Config()
    config.max_app_queue_size = 10
    async with TaskGroup() as group:
        queue_at_once(group)
        put = await group.spawn_app(app, config, {}, _ignore)
        for i in range(10):
            await put({"n": i})

        async def more() -> None:
            await put({"n": 10})
            await put({"n": 11})

        group.spawn(more)
        await trio.testing.wait_all_tasks_blocked()
        assert not received
        release.set()
    assert [m["n"] for m in received] == list(range(12))


async def _ignore(event: Any) -> None:
    pass
