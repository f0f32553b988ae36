"""read_body: a body already queued is taken without a pass through the scheduler."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from proxy.asgi import BodyTooLargeError, ClientGone, read_body

SCOPE: dict[str, Any] = {"headers": [(b"content-length", b"11")]}


async def test_a_queued_body_is_taken_without_a_checkpoint() -> None:
    send, receive = trio.open_memory_channel[dict[str, Any]](4)
    send.send_nowait({"type": "http.request", "body": b"hello", "more_body": True})
    send.send_nowait({"type": "http.request", "body": b" world", "more_body": False})
    with trio.testing.assert_no_checkpoints():
        assert await read_body(SCOPE, receive.receive, 100) == b"hello world"


async def test_a_body_still_on_its_way_is_waited_for() -> None:
    send, receive = trio.open_memory_channel[dict[str, Any]](4)
    send.send_nowait({"type": "http.request", "body": b"hello", "more_body": True})

    async def rest() -> None:
        await trio.testing.wait_all_tasks_blocked()
        await send.send({"type": "http.request", "body": b" world", "more_body": False})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rest)
        assert await read_body(SCOPE, receive.receive, 100) == b"hello world"


async def test_any_other_receive_callable_still_works() -> None:
    messages = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive() -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return messages.pop(0)

    assert await read_body(SCOPE, receive, 100) == b"{}"


async def test_limits_and_disconnects_hold_on_the_queued_path() -> None:
    send, receive = trio.open_memory_channel[dict[str, Any]](4)
    send.send_nowait({"type": "http.request", "body": b"x" * 101, "more_body": False})
    with pytest.raises(BodyTooLargeError):
        await read_body(SCOPE, receive.receive, 100)
    send.send_nowait({"type": "http.disconnect"})
    with pytest.raises(ClientGone):
        await read_body(SCOPE, receive.receive, 100)
