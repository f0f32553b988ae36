"""One attempt to serve a request on one upstream key, and the events it sends back.

A ``Job`` is created by the dispatcher for each attempt, carried to a key actor through
its inbox, and answered on the job's own reply channel: first ``Started`` or ``Failed``,
then (after ``Started``) raw body bytes, then the channel closes. Once the client's side
has taken a stream's first bytes it may hand the job a ``Sink``: from then on the key
actor writes the stream's bytes straight to the client through it (no hop through the
channel and the request task per chunk), and the channel only closes at the end.
The client's side may also give the job an ``Opener``: the key actor then sends a
stream's head itself as soon as the upstream has answered, and hands its bytes to the
sink from the first one (the request task learns of the start afterwards; waiting for
it to run first cost a scheduler pass before every stream's first byte).
Counting state lives on the job so the dispatcher can bill whatever was relayed even
when the client leaves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from workers.failure import Failure
from workers.tokens import StreamTokenCounter, Usage


@dataclass(frozen=True, slots=True)
class Started:
    """The upstream answered; body bytes follow on the reply channel."""

    status: int
    content_type: str
    upstream_key_id: str


@dataclass(frozen=True, slots=True)
class Failed:
    """The attempt failed before any byte reached the client."""

    failure: Failure
    message: str
    upstream_key_id: str | None


Event = Started | Failed | bytes


async def put(reply: trio.MemorySendChannel[Event], event: Event) -> None:
    """Send ``event`` to the client's side, without a pass through the scheduler when
    the channel has room (it usually has: replies buffer a few events). ``send`` always
    yields first; on a busy gateway a pass is milliseconds."""
    try:
        reply.send_nowait(event)
    except trio.WouldBlock:
        await reply.send(event)


class Sink(Protocol):
    """Where a stream's bytes go once the client's side has handed it over."""

    async def send(self, data: bytes) -> None:
        """Write ``data`` to the client. May raise ``trio.BrokenResourceError`` when the
        client is gone (the relay then stops as if the reply channel had closed); hypercorn
        itself drops writes to a closed connection silently."""
        ...

    @property
    def writes_now(self) -> bool:
        """Whether ``try_send`` can write at all (else it always holds: not worth it)."""
        ...

    def try_send(self, data: bytes) -> bool:
        """Write ``data`` without waiting if that can be done: True. Else False, and the
        sink holds ``data`` (or its unwritten part) until ``flush``."""
        ...

    async def flush(self) -> None:
        """Write what ``try_send`` held (raises as ``send`` does)."""
        ...


class Opener(Protocol):
    """Starts a stream's response to the client; returns where its bytes go."""

    async def __call__(self, started: Started) -> Sink:
        ...


@dataclass(eq=False, slots=True, weakref_slot=True)
class Job:
    request_id: str
    endpoint: str  # chat | completions | embeddings
    upstream_path: str  # e.g. /chat/completions, appended to the key's base_url
    body: dict[str, Any]
    raw_body: bytes  # the client's bytes, forwarded as they are when nothing needs patching
    public_model: str
    stream: bool
    include_usage: bool  # the client asked for the usage chunk
    prompt_estimate: int
    max_output: int  # tokens reserved against the key's tpm until the real usage is known
    token_budget: int | None  # cut the stream when the output estimate exceeds this
    deadline: float  # trio time after which waiting for admission is pointless
    reply: trio.MemorySendChannel[Event]
    counter: StreamTokenCounter = field(default_factory=StreamTokenCounter)
    usage: Usage | None = None  # a whole body's usage from upstream, when it sent one
    status: int = 0
    upstream_key_id: str | None = None
    first_byte_at: float | None = None
    upstream_started_at: float | None = None
    upstream_ended_at: float | None = None
    cut_for_quota: bool = False
    whole_completion_estimate: int = 0  # a non-stream body's completion, when no usage came
    aborted: bool = False
    sink: Sink | None = None  # set by the client's side; used by the relay when present
    opener: Opener | None = None  # the client's side's: the actor starts a stream with it
    _scope: trio.CancelScope | None = None

    @property
    def known_usage(self) -> Usage | None:
        """The upstream's own usage as far as it is known now: a whole body's, or the last
        a stream's counter has seen. Read from the counter rather than copied when the
        relay ends: a client that leaves the moment it has [DONE] (the openai SDK closes
        then) is billed by its request task, which may run before the stream's task does."""
        return self.usage if self.usage is not None else self.counter.upstream_usage

    def attach(self, scope: trio.CancelScope) -> None:
        """Called by the worker that runs this job, so ``abort`` can reach it."""
        self._scope = scope
        if self.aborted:
            scope.cancel()

    def abort(self) -> None:
        """The client is gone or the dispatcher gave up: stop the upstream request now."""
        self.aborted = True
        if self._scope is not None:
            self._scope.cancel()
