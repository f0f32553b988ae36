"""Early refusals (proxy.early_refusal) on a real hypercorn server: a whole request the
door refuses is answered without reaching the app; anything else reaches it as usual."""

from __future__ import annotations

from typing import Any

import h11
import pytest
import trio
import trio.testing

from proxy.asgi import read_body
from proxy.early_refusal import Refusal, encode_response, one_request
from tests.http1 import exchange, read_response, serving

BODY = b'{"model":"m"}'
POST = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY))


class Door:
    def __init__(self, retry_after_s: float = 0.0) -> None:
        self.on = True
        self.asked: list[tuple[bytes, bytes]] = []
        self.retry_after_s = retry_after_s
        self.held: list[float] = []
        self.release = trio.Event()  # ends every hold

    def active(self) -> bool:
        return self.on

    def refusal(self, method: bytes, target: bytes) -> Refusal | None:
        self.asked.append((method, target))
        if method != b"POST" or not target.startswith(b"/v1/"):
            return None
        return Refusal(429, [(b"retry-after", b"2"), (b"x-request-id", b"req_1")],
                       b'{"error":{}}', self.retry_after_s)

    async def hold(self, seconds: float) -> None:
        self.held.append(seconds)
        await self.release.wait()


class App:
    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.seen.append((scope["path"], await read_body(scope, receive, 1 << 20)))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


async def test_a_refused_request_is_answered_early_and_the_connection_goes_on() -> None:
    door, app = Door(), App()
    async with serving(app, door=door) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        head, body = await exchange(stream, conn, POST)
        assert head.status_code == 429
        headers = dict(head.headers)
        assert headers[b"retry-after"] == b"2"
        assert headers[b"x-request-id"] == b"req_1"
        assert headers[b"content-length"] == b"12"
        assert b"date" in headers  # hypercorn's own response headers, as on any answer
        assert body == b'{"error":{}}'
        assert app.seen == []
        # Not refused by the door (a GET): the app serves it on the same connection.
        head, body = await exchange(stream, conn, b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        assert (head.status_code, body) == (200, b"ok")
        # Shedding over: the app serves the completion.
        door.on = False
        head, body = await exchange(stream, conn, POST)
        assert (head.status_code, body) == (200, b"ok")
        await stream.aclose()
    assert door.asked == [(b"POST", b"/v1/chat/completions"), (b"GET", b"/health")]
    assert app.seen == [("/health", b""), ("/v1/chat/completions", BODY)]


async def test_a_refusal_back_before_its_wait_is_held_until_the_wait_is_over() -> None:
    door, app = Door(retry_after_s=30.0), App()
    answers: list[int] = []
    async with serving(app, door=door) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        head, _ = await exchange(stream, conn, POST)  # the first: answered at once
        assert (head.status_code, door.held) == (429, [])
        told_until = trio.current_time() + 30.0

        async def again() -> None:  # at once, as wrk does: before the 30 s it was told
            head, _ = await exchange(stream, conn, POST)
            answers.append(head.status_code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(again)
            await trio.testing.wait_all_tasks_blocked()
            assert answers == []  # held: nothing written yet
            assert len(door.held) == 1
            assert 29.0 < door.held[0] <= told_until - trio.current_time() + 0.5
            door.release.set()
        assert answers == [429]
        await stream.aclose()
    assert app.seen == []


async def test_a_refusal_back_after_its_wait_is_not_held() -> None:
    door, app = Door(retry_after_s=0.05), App()
    async with serving(app, door=door) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        for _ in range(2):
            head, _ = await exchange(stream, conn, POST)
            assert head.status_code == 429
            await trio.sleep(0.06)  # waits as told
        await stream.aclose()
    assert door.held == []


@pytest.mark.parametrize("writes", [
    pytest.param((POST[:40], POST[40:]), id="head split across reads"),
    pytest.param((POST[:-3], POST[-3:]), id="body split across reads"),
])
async def test_a_request_in_pieces_goes_to_the_app(writes: tuple[bytes, ...]) -> None:
    door, app = Door(), App()
    async with serving(app, door=door) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        head, body = await exchange(stream, conn, *writes)
        await stream.aclose()
    assert (head.status_code, body) == (200, b"ok")
    assert door.asked == []
    assert app.seen == [("/v1/chat/completions", BODY)]


async def test_pipelined_requests_go_to_the_app() -> None:
    door, app = Door(), App()
    async with serving(app, door=door) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(POST + POST)
        for _ in range(2):
            conn.send(h11.Request(method="POST", target="/", headers=[("host", "t"),
                                                                      ("content-length", "0")]))
            conn.send(h11.EndOfMessage())
            head, _ = await read_response(stream, conn)
            assert head.status_code == 200
            conn.start_next_cycle()
        await stream.aclose()
    assert door.asked == []
    assert len(app.seen) == 2


async def test_without_direct_send_the_door_is_not_asked() -> None:
    door, app = Door(), App()
    async with serving(app, direct=False, door=door) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        head, _ = await exchange(stream, conn, POST)
        await stream.aclose()
    assert head.status_code == 200
    assert door.asked == []


@pytest.mark.parametrize(("data", "expected"), [
    (POST, (b"POST", b"/v1/chat/completions")),
    (b"GET /x?a=1 HTTP/1.1\r\nhost: t\r\n\r\n", (b"GET", b"/x?a=1")),
    (POST[:-1], None),  # body incomplete
    (POST + b"GET", None),  # the start of another request
    (POST.replace(b"HTTP/1.1", b"HTTP/1.0"), None),
    (b"POST /v1/x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", None),
    (b"POST /v1/x HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 0\r\n\r\n", None),
    (b"POST /v1/x HTTP/1.1\r\nconnection: close\r\ncontent-length: 0\r\n\r\n", None),
    (b"POST /v1/x HTTP/1.1\r\ncontent-length: +1\r\n\r\nx", None),
    (b"POST /v1/x HTTP/1.1\r\ncontent-length : 0\r\n\r\n", None),  # space before colon
    (b"POST /v1/x HTTP/1.1\r\nno colon\r\n\r\n", None),
    (b"POST  /v1/x HTTP/1.1\r\n\r\n", None),
])
def test_only_one_plain_whole_request_qualifies(
    data: bytes, expected: tuple[bytes, bytes] | None,
) -> None:
    assert one_request(data) == expected


def test_the_encoded_response_is_what_h11_reads() -> None:
    raw = encode_response(429, [(b"retry-after", b"1")], b"{}", [(b"server", b"s")])
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("host", "t"),
                                                              ("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    head = conn.next_event()
    assert isinstance(head, h11.Response)
    assert head.status_code == 429
    assert head.reason == b"Too Many Requests"
    assert dict(head.headers) == {b"retry-after": b"1", b"server": b"s",
                                  b"content-length": b"2"}
    data = conn.next_event()
    assert isinstance(data, h11.Data)
    assert data.data == b"{}"
    assert isinstance(conn.next_event(), h11.EndOfMessage)
