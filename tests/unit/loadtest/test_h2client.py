"""The stream generator's h2c client (loadtest.bench.h2client) against hypercorn: events
in order, many streams on one connection, and a stream given up on is reset."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from loadtest.bench.h2client import H2Conn
from tests.http1 import serving


def _headers(path: bytes) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"t"),
            (b":path", path), (b"content-type", b"application/json"),
            (b"content-length", b"2")]


class App:
    def __init__(self) -> None:
        self.disconnected = trio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        if scope["path"] == "/hang":
            await send({"type": "http.response.body", "body": b"data: 1\n\n",
                        "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected.set()
            return
        for n in range(3):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % n,
                        "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def _events(channel: trio.MemoryReceiveChannel[Any]) -> list[Any]:
    return [event async for event in channel]


async def test_streams_on_one_connection_each_get_their_events() -> None:
    app = App()
    async with serving(app, direct=False) as port, trio.open_nursery() as nursery:
        conn = H2Conn(await trio.open_tcp_stream("127.0.0.1", port), max_streams=100)
        await conn.start(nursery)
        results: list[list[Any]] = []

        async def one() -> None:
            _, events = await conn.request(_headers(b"/ok"), b"{}")
            results.append(await _events(events))

        async with trio.open_nursery() as streams:
            for _ in range(10):
                streams.start_soon(one)
        await conn.aclose()
        nursery.cancel_scope.cancel()
    assert len(results) == 10
    for events in results:
        assert events[0] == ("head", 200)
        assert events[-1] == ("end", None)
        body = b"".join(data for kind, data in events if kind == "data")
        assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"


async def test_a_stream_given_up_on_is_reset_and_the_server_hears_of_it() -> None:
    app = App()
    async with serving(app, direct=False) as port, trio.open_nursery() as nursery:
        conn = H2Conn(await trio.open_tcp_stream("127.0.0.1", port), max_streams=100)
        await conn.start(nursery)
        stream_id, events = await conn.request(_headers(b"/hang"), b"{}")
        assert await events.receive() == ("head", 200)
        assert (await events.receive())[0] == "data"
        with trio.CancelScope() as scope:  # the reader times out...
            scope.cancel()
            await conn.cancel(stream_id)  # ...and still resets its stream
        with trio.fail_after(5):
            await app.disconnected.wait()
        await conn.cancel(stream_id)  # twice is harmless
        await conn.aclose()
        nursery.cancel_scope.cancel()
