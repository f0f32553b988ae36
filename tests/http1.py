"""Test helpers for HTTP/1.1 at the byte level: hypercorn serving a bare ASGI app on
loopback (with proxy.direct_send configured), and reading a response with h11."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import h11
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from proxy.direct_send import configure
from proxy.early_refusal import EarlyDoor

App = Callable[[Any, Any, Any], Awaitable[None]]


def with_lifespan(app: App) -> App:
    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        else:
            await app(scope, receive, send)
    return wrapped


@asynccontextmanager
async def serving(app: App, *, direct: bool = True, door: EarlyDoor | None = None,
                  stop: trio.Event | None = None, **config_values: Any) -> AsyncIterator[int]:
    """hypercorn's trio worker serving the HTTP ``app`` on a free loopback port, until
    the block ends or ``stop`` is set; ``config_values`` set hypercorn's Config."""
    config = Config()
    assert configure(config, direct_send=direct, door=door) is direct
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5
    for name, value in config_values.items():
        setattr(config, name, value)
    stop = trio.Event() if stop is None else stop
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(
            with_lifespan(app), config, shutdown_trigger=stop.wait, task_status=task_status))
        yield int(binds[0].rsplit(":", 1)[1])
        stop.set()


async def read_response(
    stream: trio.SocketStream, conn: h11.Connection, *, pause_s: float = 0.0,
    read_size: int = 65536,
) -> tuple[h11.Response, bytes]:
    """One response, parsed by h11; ``pause_s`` first (a client slow to start reading)."""
    await trio.sleep(pause_s)
    head: h11.Response | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(read_size))
        elif isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, bytes(body)
        else:
            raise AssertionError(f"unexpected {event!r}")


async def connect(where: str | int) -> trio.SocketStream:
    """A connection to ``http://host:port`` (a base URL), or to a port on loopback."""
    if isinstance(where, int):
        return await trio.open_tcp_stream("127.0.0.1", where)
    host, port = where.removeprefix("http://").split("/", 1)[0].rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def exchange(stream: trio.SocketStream, conn: h11.Connection, *writes: bytes,
                   gap_s: float = 0.05) -> tuple[h11.Response, bytes]:
    """Send one request as the raw ``writes``, ``gap_s`` apart (so that the server reads
    them separately), and read its response; ``conn`` is the client's h11 state of the
    connection, ready for the next request afterwards."""
    for i, data in enumerate(writes):
        if i:
            await trio.sleep(gap_s)
        await stream.send_all(data)
    # h11 parses a response only to a request it has seen sent: any request will do.
    conn.send(h11.Request(method="POST", target="/", headers=[("host", "t"),
                                                              ("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    response = await read_response(stream, conn)
    conn.start_next_cycle()
    return response


async def fetch(port: int, path: str = "/") -> tuple[h11.Response, bytes]:
    """``GET path`` on a new loopback connection, closed afterwards."""
    stream = await connect(port)
    try:
        return await exchange(stream, h11.Connection(h11.CLIENT),
                              f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
    finally:
        await stream.aclose()
