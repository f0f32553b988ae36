"""Refusing an overloaded request before hypercorn parses it: the HTTP/1.1 side.

Owns :class:`EarlyDoor` (what the connection handler asks), :class:`Refusal`,
:func:`one_request` and :func:`encode_response`. While the gateway sheds load, most of a
refusal's price is hypercorn's and h11's: parsing the request, building its scope, a
task and a channel for it, and sending the answer through h11 (~0.4 CPU-ms, about half
of what serving a small completion costs). At twice the capacity the refusals alone then
take most of the core. ``proxy.direct_send.DirectSendServer`` asks the door about each
read that holds exactly one whole request while the door is active (the gateway's: while
the admission control has a limit), and writes the refusal itself.

Only the plainest requests qualify (:func:`one_request`): HTTP/1.1, a whole head and a
``content-length`` body in one read, no ``transfer-encoding``, ``expect``, ``upgrade``
or ``connection: close``, and the connection between requests with nothing buffered.
Anything else goes to hypercorn as usual, and the app's own door still applies. A
connection that gets only early refusals is not an active one to hypercorn: its
keep-alive timer, armed after its last served response, still runs.

A request refused again on a connection before the ``retry-after`` its last refusal told
(:attr:`Refusal.retry_after_s`) may be held before its answer (:meth:`EarlyDoor.hold`;
the gateway's holds are off unless ``AIRGATE_REFUSAL_HOLD_MS`` is set, see
``workers.overload``), so that a client that ignores the wait cannot spin on refusals.
The connection's reading waits meanwhile, which is what its client does anyway, as
HTTP/1.1 answers in order.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import NamedTuple, Protocol

Headers = list[tuple[bytes, bytes]]

_REFUSED_HEADERS = {b"transfer-encoding", b"expect", b"upgrade"}


class Refusal(NamedTuple):
    """The answer to a request refused early, and the wait it tells the client."""

    status: int
    headers: Headers
    body: bytes
    retry_after_s: float = 0.0


class EarlyDoor(Protocol):
    def active(self) -> bool:
        """Whether to screen requests now (cheap: asked on every read)."""

    def refusal(self, method: bytes, target: bytes) -> Refusal | None:
        """The answer to a request refused now, or None to let it in. Called only while
        ``active()``, for each whole plain request."""

    async def hold(self, seconds: float) -> None:
        """Wait up to ``seconds`` before answering a refusal that came back too soon."""


def one_request(data: bytes) -> tuple[bytes, bytes] | None:
    """(method, target) when ``data`` is exactly one plain HTTP/1.1 request, else None."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    line_end = data.find(b"\r\n")
    parts = data[:line_end].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        return None
    length = 0
    for line in data[line_end + 2 : end].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or name != name.strip():
            return None
        name = name.lower()
        if name == b"content-length":
            digits = value.strip()
            if not digits.isdigit():
                return None
            length = int(digits)
        elif name in _REFUSED_HEADERS or (name == b"connection" and b"close" in value.lower()):
            return None
    if end + 4 + length != len(data):
        return None
    return parts[0], parts[1]


def encode_response(status: int, headers: Headers, body: bytes, server_headers: Headers) -> bytes:
    """A whole HTTP/1.1 response with a ``content-length`` body."""
    lines = [b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode())]
    lines += [name + b": " + value for name, value in (*headers, *server_headers)]
    lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
