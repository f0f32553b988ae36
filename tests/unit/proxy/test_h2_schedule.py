"""``proxy.h2_schedule``: hypercorn's HTTP/2 streams take turns, and the install."""

from __future__ import annotations

import priority
import pytest
from hypercorn.protocol import h2 as hypercorn_h2

from proxy.h2_schedule import RoundRobin, install


def _take(tree: RoundRobin, n: int) -> list[int]:
    return [next(tree) for _ in range(n)]


def test_streams_that_may_send_take_turns() -> None:
    tree = RoundRobin()
    for stream_id in (1, 3, 5):
        tree.insert_stream(stream_id)
    assert _take(tree, 7) == [1, 3, 5, 1, 3, 5, 1]


def test_blocked_streams_are_skipped_and_come_back_when_unblocked() -> None:
    tree = RoundRobin()
    for stream_id in (1, 3, 5):
        tree.insert_stream(stream_id)
        tree.block(stream_id)  # as hypercorn does with a new stream
    with pytest.raises(priority.DeadlockError):
        next(tree)
    tree.unblock(3)
    assert _take(tree, 2) == [3, 3]
    tree.unblock(1)
    tree.block(3)
    assert _take(tree, 2) == [1, 1]
    tree.block(1)
    with pytest.raises(priority.DeadlockError):
        next(tree)


def test_a_stream_blocked_and_unblocked_while_queued_is_queued_once() -> None:
    tree = RoundRobin()
    tree.insert_stream(1)
    tree.insert_stream(3)
    for _ in range(5):
        tree.block(1)
        tree.unblock(1)
    assert _take(tree, 4) == [1, 3, 1, 3]  # one turn each, not six for stream 1


def test_removed_streams_are_gone() -> None:
    tree = RoundRobin()
    tree.insert_stream(1)
    tree.insert_stream(3)
    tree.remove_stream(1)
    assert _take(tree, 2) == [3, 3]
    for call in (tree.block, tree.unblock, tree.remove_stream):
        with pytest.raises(priority.MissingStreamError):
            call(1)
    tree.insert_stream(1)  # a removed id may come back (never, in HTTP/2: ids grow)
    assert sorted(_take(tree, 2)) == [1, 3]


def test_a_stream_is_inserted_once() -> None:
    tree = RoundRobin()
    tree.insert_stream(1, depends_on=None, weight=16, exclusive=False)
    with pytest.raises(priority.DuplicateStreamError):
        tree.insert_stream(1)
    tree.reprioritize(stream_id=1, depends_on=None, weight=200, exclusive=True)
    assert next(tree) == 1


def test_priority_frames_for_unknown_streams_leave_nothing_behind() -> None:
    """hypercorn inserts (and blocks) a stream that reprioritize says is missing: a
    client's PRIORITY frames for ids it never opens would then pile up for good."""
    tree = RoundRobin()
    for stream_id in range(1, 20_001, 2):
        tree.reprioritize(stream_id=stream_id, depends_on=None, weight=16, exclusive=False)
    with pytest.raises(priority.DeadlockError):
        next(tree)
    tree.insert_stream(1)  # its HEADERS arrive: inserted as usual
    assert next(tree) == 1
    assert len(tree._active) == 1


def test_install_gives_hypercorn_the_round_robin_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn_h2, "priority", priority)  # undone after the test
    assert install()
    assert install()  # twice is harmless
    view = hypercorn_h2.priority
    assert view.PriorityTree is RoundRobin
    assert view.DeadlockError is priority.DeadlockError
    assert view.MissingStreamError is priority.MissingStreamError
    assert view.DuplicateStreamError is priority.DuplicateStreamError
