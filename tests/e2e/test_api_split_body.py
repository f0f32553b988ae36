"""/api answers that come before the request body has arrived leave the connection usable."""

from __future__ import annotations

import h11
import orjson
import trio

from tests.e2e.conftest import Harness
from tests.http1 import connect, exchange


async def test_an_api_refusal_before_the_body_arrived_leaves_the_connection_usable(
    harness: Harness,
) -> None:
    """No token: 401 before the body is read. The body comes 0.2 s after the head; the
    next request on the same connection is still answered."""
    body = b'{"name": "k", "base_url": "http://127.0.0.1:9/v1", "secret": "s"}'
    head = (b"POST /api/admin/upstream-keys HTTP/1.1\r\nhost: gw\r\n"
            b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body))
    stream = await connect(harness.base_url)
    conn = h11.Connection(h11.CLIENT)
    for _ in range(2):
        with trio.fail_after(5):
            response, data = await exchange(stream, conn, head, body, gap_s=0.2)
        assert response.status_code == 401
        assert orjson.loads(data)["error"]["message"]
    await stream.aclose()
