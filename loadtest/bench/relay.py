"""The bare relay: the baseline every gateway figure is compared with.

A raw ASGI app on one hypercorn trio worker that forwards ``POST /v1/*`` to the upstream
through one shared ``httpx.AsyncClient`` and relays the answer's bytes as they come
(``aiter_raw``). No auth, no accounting, no parsing: what any Python trio proxy costs
before it does anything useful. ``python -m loadtest.bench.relay --upstream URL --port P``.
Must not import ``proxy``, ``workers`` or ``store``.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

Message = dict[str, Any]
_PASS = (b"content-type", b"content-length")


class Relay:
    def __init__(self, upstream: str, client: httpx.AsyncClient, key: str) -> None:
        self.upstream, self.client, self.auth = upstream.rstrip("/"), client, f"Bearer {key}"

    async def __call__(
        self, scope: Message, receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        request = self.client.build_request(
            "POST", self.upstream + scope["path"], content=body,
            headers={"content-type": "application/json", "authorization": self.auth},
        )
        response = await self.client.send(request, stream=True)
        try:
            headers = [(k, v) for k, v in response.headers.raw if k.lower() in _PASS]
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": headers})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()


async def run_relay(upstream: str, host: str, port: int, key: str) -> None:
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.backlog = 1024
    config.keep_alive_max_requests = 1_000_000
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with (
        httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120)) as client,
        trio.open_nursery() as nursery,
    ):
        app = cast(Any, Relay(upstream, client, key))
        binds = await nursery.start(partial(serve, app, config, mode="asgi"))
        print(f"relay listening on {binds[0]}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main() -> None:
    parser = argparse.ArgumentParser(description="A bare trio relay (benchmark baseline).")
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9100")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--key", default="mock-bench", help="bearer key sent upstream")
    args = parser.parse_args()
    trio.run(run_relay, args.upstream, args.host, args.port, args.key)


if __name__ == "__main__":
    main()
