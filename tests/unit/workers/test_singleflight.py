"""SingleFlight: concurrent reads of one key share the first caller's read."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from workers.singleflight import SingleFlight


async def test_concurrent_callers_share_one_read(autojump_clock: MockClock) -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    reads: list[str] = []
    results: list[int] = []

    async def read() -> int:
        reads.append("a")
        await trio.sleep(1)
        return 42

    async def caller() -> None:
        results.append(await flights.run("a", read))

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(caller)
    assert reads == ["a"]
    assert results == [42] * 50
    assert flights.in_flight() == 0
    assert await flights.run("a", read) == 42  # done: the next call reads again
    assert reads == ["a", "a"]


async def test_other_keys_are_read_on_their_own(autojump_clock: MockClock) -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    reads: list[str] = []

    async def read_of(key: str) -> str:
        reads.append(key)
        await trio.sleep(1)
        return key.upper()

    results: dict[str, str] = {}

    async def caller(key: str) -> None:
        results[key] = await flights.run(key, lambda: read_of(key))

    async with trio.open_nursery() as nursery:
        for key in ("a", "b", "a", "b"):
            nursery.start_soon(caller, key)
    assert sorted(reads) == ["a", "b"]
    assert results == {"a": "A", "b": "B"}


async def test_the_leaders_error_reaches_every_waiter(autojump_clock: MockClock) -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    reads = 0

    async def read() -> int:
        nonlocal reads
        reads += 1
        await trio.sleep(1)
        raise LookupError("database down")

    errors: list[BaseException] = []

    async def caller() -> None:
        try:
            await flights.run("a", read)
        except LookupError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(caller)
    assert reads == 1
    assert len(errors) == 5
    assert all(str(exc) == "database down" for exc in errors)


async def test_a_cancelled_leader_hands_the_read_to_a_waiter(autojump_clock: MockClock) -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    reads = 0

    async def read() -> int:
        nonlocal reads
        reads += 1
        await trio.sleep(10)
        return reads

    results: list[int] = []

    async def waiter() -> None:
        results.append(await flights.run("a", read))

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(1):  # the leader's client leaves after a second
            nursery.start_soon(waiter)  # starts after the leader: it waits
            await flights.run("a", read)
            pytest.fail("the leader was not cancelled")
    assert reads == 2  # the waiter read for itself once the leader was gone
    assert results == [2]
