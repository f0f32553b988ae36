"""Reading the upstream sockets of many relayed streams from one task.

Owns :class:`ReadPump`. A relayed stream's upstream sends an event every few
milliseconds. Read by the stream's own task, every event costs a trio wake-up (the
task's reschedule, its turn in the next pass, the resumption of the relay's chain of
coroutines) and an ``epoll_ctl`` to re-arm the socket in trio's one-shot epoll set.

The pump keeps the sockets of the streams it is given in an epoll set of its own
(level-triggered, armed once per stream) and waits for that set's descriptor in trio's.
One wake-up calls the handler of every socket that has data; a handler reads, counts
and writes to the client without a checkpoint. A handler that cannot finish (the
client's buffer is full, the body ended or failed) takes its socket out of the set and
wakes its stream's task, which does the rest the usual way. Handlers run one at a time
in the pump's task, so they see no other task's half-done work.

A step calls at most ``_BATCH`` handlers and then lets the scheduler run other tasks:
level-triggered sockets that still have data come back in the next poll.
"""

from __future__ import annotations

import contextlib
import logging
import select
from collections.abc import Callable

import trio

log = logging.getLogger("airgate.pump")

Handler = Callable[[], None]

_BATCH = 64
_EVENTS = select.EPOLLIN | select.EPOLLRDHUP if hasattr(select, "epoll") else 0


class ReadPump:
    """An epoll set of upstream sockets and the task that serves it (see the module
    docstring). ``running`` says whether streams may be given to it."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._handlers: dict[int, Handler] = {}
        self.running = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the set until cancelled. Where there is no epoll (not Linux), only
        reports started: ``running`` stays False and streams keep their own tasks."""
        if not hasattr(select, "epoll"):
            task_status.started()
            await trio.sleep_forever()
        epoll = self._epoll = select.epoll()
        handlers = self._handlers
        self.running = True
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, _ in epoll.poll(0, _BATCH):
                    handler = handlers.get(fd)
                    if handler is None:
                        continue
                    try:
                        handler()
                    except Exception:
                        # A handler must not raise; if one does, its stream's task is
                        # not told, so the stream ends on its idle timeout.
                        log.exception("pump handler failed; socket dropped")
                        self.remove(fd)
        finally:
            self.running = False
            self._handlers.clear()
            self._epoll = None
            epoll.close()

    def add(self, fd: int, handler: Handler) -> None:
        """Call ``handler`` whenever ``fd`` has data, until ``remove(fd)``. ``fd`` must
        stay open until then."""
        assert self._epoll is not None
        try:
            self._epoll.register(fd, _EVENTS)
        except FileExistsError:  # defensive: a stale entry for a reused number
            self._epoll.modify(fd, _EVENTS)
        self._handlers[fd] = handler

    def remove(self, fd: int) -> None:
        """Stop serving ``fd`` (no-op when it is not served)."""
        if self._handlers.pop(fd, None) is not None and self._epoll is not None:
            with contextlib.suppress(OSError):  # closed: the kernel dropped it already
                self._epoll.unregister(fd)
