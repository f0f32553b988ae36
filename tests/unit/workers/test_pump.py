"""ReadPump: handlers called while their sockets have data, and only until removed."""

from __future__ import annotations

import socket

import pytest
import trio

from workers.pump import ReadPump


async def _settle() -> None:
    """Let the pump run until nothing is left to do."""
    for _ in range(5):
        await trio.testing.wait_all_tasks_blocked()


async def test_a_handler_runs_while_its_socket_has_data_and_stops_once_removed() -> None:
    pump = ReadPump()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(pump.run)
        assert pump.running
        pump.add(ours.fileno(), lambda: got.append(ours.recv(3)))
        theirs.send(b"abcdefgh")
        await _settle()
        # Level-triggered: a handler that leaves bytes behind is called again.
        assert got == [b"abc", b"def", b"gh"]
        pump.remove(ours.fileno())
        theirs.send(b"more")
        await _settle()
        assert got == [b"abc", b"def", b"gh"]
        pump.remove(ours.fileno())  # twice: no error
        nursery.cancel_scope.cancel()
    assert not pump.running
    ours.close()
    theirs.close()


async def test_a_failing_handler_loses_its_socket_not_the_pump(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pump = ReadPump()
    bad, bad_peer = socket.socketpair()
    good, good_peer = socket.socketpair()
    for sock in (bad, good):
        sock.setblocking(False)
    got: list[bytes] = []

    def fail() -> None:
        raise RuntimeError("bug")

    async with trio.open_nursery() as nursery:
        await nursery.start(pump.run)
        pump.add(bad.fileno(), fail)
        pump.add(good.fileno(), lambda: got.append(good.recv(100)))
        bad_peer.send(b"x")
        good_peer.send(b"y")
        await _settle()
        assert got == [b"y"]
        assert bad.fileno() not in pump._handlers
        good_peer.send(b"z")
        await _settle()
        assert got == [b"y", b"z"]
        nursery.cancel_scope.cancel()
    assert "pump handler failed" in caplog.text
    for sock in (bad, bad_peer, good, good_peer):
        sock.close()
