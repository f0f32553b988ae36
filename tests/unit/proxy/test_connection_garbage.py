"""A finished client connection is freed by reference counting: nothing of it is left for
the garbage collector, whose pass over such leftovers stopped the gateway for 20-50 ms
at a time when many connections came and went (proxy.direct_send.DirectSendServer.run)."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from proxy.early_refusal import Refusal
from tests.http1 import serving

REQUEST = b"GET / HTTP/1.1\r\nhost: t\r\n\r\n"


class OpenDoor:
    """Screens every read (as the gateway's door does under load) and refuses nothing."""

    def active(self) -> bool:
        return True

    def refusal(self, method: bytes, target: bytes) -> Refusal | None:
        return None

    async def hold(self, seconds: float) -> None:
        raise AssertionError("nothing is refused")


async def app(scope: Any, receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def collector_off() -> Iterator[None]:
    """Automatic collections off, so that what a test leaves for the collector stays."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


# A connection's own objects; anything else the collector finds (pytest's, say) is not
# this test's business. (trio's public classes report the module "trio".)
_CONNECTION_MODULES = ("hypercorn.", "h11.", "proxy.", "trio")


def garbage() -> Counter[str]:
    """A connection's objects that only the collector could free since the last
    collection, by type."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    found = Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                    if type(o).__module__.startswith(_CONNECTION_MODULES))
    gc.set_debug(0)
    gc.garbage.clear()
    return found


async def _request(port: int, *, server_closes: bool) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(REQUEST)
    data = b""
    while not data.endswith(b"ok"):
        data += await stream.receive_some(65536)
    if server_closes:  # it stays idle past the keep-alive timeout
        while await stream.receive_some(65536):
            pass
    await stream.aclose()


@pytest.mark.usefixtures("collector_off")
@pytest.mark.parametrize(("direct", "door", "server_closes"), [
    pytest.param(True, False, False, id="direct"),
    pytest.param(True, True, False, id="direct+door"),
    pytest.param(True, True, True, id="direct+door, closed idle by the server"),
    pytest.param(False, False, False, id="hypercorn's writes"),
])
async def test_a_finished_connection_leaves_nothing_for_the_garbage_collector(
    direct: bool, door: bool, server_closes: bool,
) -> None:
    async with serving(app, direct=direct, door=OpenDoor() if door else None,
                       keep_alive_timeout=0.05) as port:
        await _request(port, server_closes=server_closes)  # the server's first, warm-up
        await trio.sleep(0.1)
        garbage()
        for _ in range(20):
            await _request(port, server_closes=server_closes)
        await trio.sleep(0.1)  # the server's side of the last one ends
        assert garbage() == Counter()
