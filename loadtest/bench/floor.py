"""The floor: what the mandated HTTP server costs per stream before any relaying.

A raw ASGI app on one hypercorn trio worker that answers every ``POST /v1/*`` with the
Python mock's answer to the ``stream`` scenario (20 content events, the usage event and
``[DONE]``), captured once under trio's ``MockClock``: no upstream, no parsing, no auth.
With ``--split`` each event is its own ASGI message, as a relay must send events that
arrive apart (the realistic scenario's are 10 ms apart). Run it as the bench's
``compare`` target to read hypercorn's own CPU-milliseconds per request
(``loadtest/README.md`` has the recipe); a gateway built on hypercorn cannot cost less.
Must not import ``proxy``, ``workers`` or ``store``.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.trio import serve

from loadtest.bench.cli import request_body
from loadtest.bench.native_mock import receive_once
from loadtest.bench.processes import MODEL
from loadtest.mock_shapes import MockConfig
from loadtest.mock_upstream import MockUpstream

Message = dict[str, Any]


async def _answer() -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """The mock's headers and body messages for the stream scenario."""
    headers: list[tuple[bytes, bytes]] = []
    parts: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers.extend(message["headers"])
        elif message.get("body"):
            parts.append(message["body"])

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "http_version": "1.1", "headers": [(b"authorization", b"Bearer sk-floor")]}
    await MockUpstream(MockConfig())(scope, receive_once(request_body("stream", MODEL)), send)
    return headers, parts


def capture_answer() -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    return trio.run(_answer, clock=trio.testing.MockClock(autojump_threshold=0))


class Floor:
    def __init__(self, headers: list[tuple[bytes, bytes]], parts: list[bytes]) -> None:
        self.headers = headers
        self.parts = parts

    async def __call__(
        self, scope: Message, receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        if scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        for part in self.parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def run_floor(
    host: str, port: int, headers: list[tuple[bytes, bytes]], parts: list[bytes]
) -> None:
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.backlog = 1024
    config.keep_alive_max_requests = 1_000_000
    async with trio.open_nursery() as nursery:
        app = cast(Any, Floor(headers, parts))
        binds = await nursery.start(partial(serve, app, config, mode="asgi"))
        print(f"floor listening on {binds[0]} ({len(parts)} body messages per answer)",
              flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main() -> None:
    parser = argparse.ArgumentParser(
        description="hypercorn answering a canned stream (the per-request floor).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9300)
    parser.add_argument("--split", action="store_true",
                        help="one ASGI message per event instead of the whole body at once")
    args = parser.parse_args()
    headers, parts = capture_answer()
    if not args.split:
        parts = [b"".join(parts)]
    trio.run(run_floor, args.host, args.port, headers, parts)


if __name__ == "__main__":
    main()
