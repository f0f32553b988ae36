"""Queued connections are accepted together, not one per pass of the scheduler."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import trio
import trio.testing
from hypercorn.trio import run as hypercorn_run

from proxy.batch_accept import BATCH, BatchListener, install


@contextmanager
def listening() -> Iterator[socket.socket]:
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        yield sock
    finally:
        sock.close()


@contextmanager
def clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections the kernel has completed and queued for accept."""
    made = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    try:
        yield made
    finally:
        for sock in made:
            sock.close()


async def test_one_wait_then_the_queued_connections_without_a_checkpoint() -> None:
    with listening() as raw, clients(raw.getsockname()[1], 10) as made:
        listener = BatchListener(trio.socket.from_stdlib_socket(raw))
        first = await listener.accept()
        with trio.testing.assert_no_checkpoints():
            rest = [await listener.accept() for _ in range(9)]
        peers = {s.socket.getpeername() for s in [first, *rest]}
        assert peers == {c.getsockname() for c in made}
        # Nothing left: the next accept waits for a new connection.
        accepted: list[trio.SocketStream] = []

        async def accept_one() -> None:
            accepted.append(await listener.accept())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_one)
            await trio.testing.wait_all_tasks_blocked()
            assert accepted == []  # blocked waiting, not handed a stale connection
            late = socket.create_connection(raw.getsockname())
        stream = accepted[0]
        assert stream.socket.getpeername() == late.getsockname()
        late.close()
        for s in [first, *rest, stream]:
            await s.aclose()


async def test_a_batch_is_bounded_and_the_rest_comes_in_the_next() -> None:
    with listening() as raw, clients(raw.getsockname()[1], BATCH + 5):
        listener = BatchListener(trio.socket.from_stdlib_socket(raw))
        streams = [await listener.accept()]
        with trio.testing.assert_no_checkpoints():
            streams += [await listener.accept() for _ in range(BATCH)]
        streams += [await listener.accept() for _ in range(4)]  # a second batch
        assert len({s.socket.getpeername() for s in streams}) == BATCH + 5
        for s in streams:
            await s.aclose()


async def test_closing_closes_the_connections_accepted_but_not_handed_out() -> None:
    with listening() as raw, clients(raw.getsockname()[1], 3) as made:
        listener = BatchListener(trio.socket.from_stdlib_socket(raw))
        first = await listener.accept()
        await listener.aclose()
        for client in made:
            if client.getsockname() != first.socket.getpeername():
                client.settimeout(1)
                assert client.recv(1) == b""  # closed by the gateway's side
        await first.aclose()


def test_hypercorn_builds_its_listeners_from_it() -> None:
    assert install()
    assert install()  # once is enough; again changes nothing
    shim = hypercorn_run.trio
    assert shim.SocketListener is BatchListener
    assert shim.open_nursery is trio.open_nursery
    assert shim.serve_listeners is trio.serve_listeners
