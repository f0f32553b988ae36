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


class FakeWriter:
    """A ChunkWriter whose socket takes ``room`` bytes now; the rest waits for
    ``write_rest`` (which takes ``rest_s`` seconds)."""

    def __init__(self, room: int, rest_s: float = 1.0) -> None:
        self.room = room
        self.rest_s = rest_s
        self.wire: list[bytes] = []

    async def write(self, data: bytes) -> bool:
        self.wire.append(data)
        return True

    def write_now(self, data: bytes) -> bytes | None:
        if self.room <= 0:
            return None
        taken = data[: self.room]
        self.room -= len(taken)
        self.wire.append(taken)
        return data[len(taken):]

    async def write_rest(self, rest: bytes) -> None:
        await trio.sleep(self.rest_s)
        self.wire.append(rest)


async def never(message: Any) -> None:
    raise AssertionError("ASGI path not expected")


async def test_try_send_writes_now_when_the_socket_takes_it_all(
    autojump_clock: MockClock,
) -> None:
    writer = FakeWriter(room=100)
    sink = ClientSink(never, writer)  # type: ignore[arg-type]
    await trio.sleep(5)
    assert sink.try_send(b"chunk")
    assert writer.wire == [b"chunk"]
    assert sink.last == trio.current_time()


async def test_a_part_written_chunk_is_finished_before_any_other_writer(
    autojump_clock: MockClock,
) -> None:
    writer = FakeWriter(room=3)
    sink = ClientSink(never, writer)  # type: ignore[arg-type]
    assert not sink.try_send(b"chunk")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.send, b": ping\n\n")  # must wait for the rest
        await trio.sleep(0.1)
        await sink.flush()
    assert writer.wire == [b"chu", b"nk", b": ping\n\n"]


async def test_nothing_written_is_held_and_sent_the_waiting_way_by_flush(
    autojump_clock: MockClock,
) -> None:
    writer = FakeWriter(room=0)
    sink = ClientSink(never, writer)  # type: ignore[arg-type]
    assert not sink.try_send(b"chunk")
    assert writer.wire == []
    await sink.flush()
    assert writer.wire == [b"chunk"]
    await sink.flush()  # nothing left: nothing written twice
    assert writer.wire == [b"chunk"]


async def test_try_send_does_not_cut_into_another_writers_chunk(
    autojump_clock: MockClock,
) -> None:
    sent: list[bytes] = []

    async def slow_send(message: Any) -> None:
        await trio.sleep(1.0)
        sent.append(message["body"])

    sink = ClientSink(slow_send)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink.send, b": ping\n\n")
        await trio.sleep(0.1)
        assert not sink.try_send(b"chunk")  # the ping is being written
        await sink.flush()
    assert sent == [b": ping\n\n", b"chunk"]
