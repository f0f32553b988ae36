"""ClientSink: one writer at a time, so a ping never lands inside a chunk."""

from __future__ import annotations

from typing import Any

import trio
from trio.testing import MockClock

from proxy.v1_stream import ClientSink


async def test_a_second_writer_waits_until_the_first_is_done(
    autojump_clock: MockClock,
) -> None:
    log: list[tuple[str, bytes]] = []

    async def slow_send(message: Any) -> None:
        log.append(("begin", message["body"]))
        await trio.sleep(1.0)  # a client reading slowly: the write takes a while
        log.append(("end", message["body"]))

    sink = ClientSink(slow_send)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.send, b"chunk")
        await trio.sleep(0.1)
        nursery.start_soon(sink.send, b": ping\n\n")
        nursery.start_soon(sink.send, b"chunk2")
    # Each write ends before the next begins; the first writer goes first.
    assert [step for step, _ in log] == ["begin", "end"] * 3
    assert log[0] == ("begin", b"chunk")
    assert all(log[i][1] == log[i + 1][1] for i in range(0, 6, 2))
    assert {body for _, body in log} == {b"chunk", b": ping\n\n", b"chunk2"}
    assert sink.last == trio.current_time()


async def test_a_cancelled_write_frees_the_sink(autojump_clock: MockClock) -> None:
    sent: list[bytes] = []

    async def stuck_send(message: Any) -> None:
        if message["body"] == b"stuck":
            await trio.sleep_forever()
        sent.append(message["body"])

    sink = ClientSink(stuck_send)
    with trio.move_on_after(1.0):
        await sink.send(b"stuck")
    await sink.send(b"next")
    assert sent == [b"next"]
