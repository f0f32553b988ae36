"""/api answers that come before the request body has arrived leave the connection usable."""

from __future__ import annotations

import h11
import orjson
import trio

from tests.e2e.conftest import Harness
from tests.http1 import read_response


async def test_an_api_refusal_before_the_body_arrived_leaves_the_connection_usable(
    harness: Harness,
) -> None:
    """No token: 401 before the body is read. The body comes 0.2 s after the head; the
    next request on the same connection is still answered."""
    body = b'{"name": "k", "base_url": "http://127.0.0.1:9/v1", "secret": "s"}'
    head = (b"POST /api/admin/upstream-keys HTTP/1.1\r\nhost: gw\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body))
    host, port = harness.base_url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    conn = h11.Connection(h11.CLIENT)
    for _ in range(2):
        await stream.send_all(head)
        await trio.sleep(0.2)
        await stream.send_all(body)
        conn.send(h11.Request(method="POST", target="/api/admin/upstream-keys",
                              headers=[("host", "gw"), ("content-length", str(len(body)))]))
        conn.send(h11.Data(data=body))
        conn.send(h11.EndOfMessage())
        with trio.fail_after(5):
            response, data = await read_response(stream, conn)
        assert response.status_code == 401
        assert orjson.loads(data)["error"]["message"]
        conn.start_next_cycle()
    await stream.aclose()
