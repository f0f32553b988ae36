"""Incremental Server-Sent-Events splitting for relaying upstream streams byte-for-byte.

Owns :class:`SSESplitter` and :class:`SSEEvent`. The splitter cuts an upstream byte stream
into events without re-encoding them: each event's ``raw`` bytes are exactly the input
bytes, terminating blank line included, so the gateway forwards them unchanged, while
``data`` gives the decoded ``data`` field for token counting and usage.

Parsing follows the WHATWG SSE rules: lines end in CRLF, LF or CR; a blank line ends an
event; lines starting with ``:`` are comments; ``field:value`` drops one space after the
colon; a line without a colon is a field with an empty value; several ``data`` lines are
joined by LF. ``data`` is None when the event has no ``data`` field (a ``: ping`` comment,
or a stray blank line, which is returned as an event of its own so that the ``raw`` bytes
of all events always concatenate to the input).

Splitting is invariant to how the input is cut into :meth:`SSESplitter.feed` calls. That
needs one concession: a CR at the very end of the buffered input might be the first half of
a CRLF, so an event whose blank line ends in CR is held back until the next byte arrives
(or :meth:`SSESplitter.flush`). LF-only streams, which is what OpenAI-style upstreams send,
never wait and take a fast path built on ``bytes.find``.

Pure Python: no I/O, no trio, no httpx. Imports nothing from the gateway.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_CR = 0x0D
_LF = 0x0A
# A blank line: two line terminators in a row. ``\r(?!\n)`` keeps a CRLF from being read as
# CR followed by LF (which would be a blank line that is not there).
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
# The longest blank-line match is 4 bytes; rescanning this far back finds any match that
# the bytes of the previous feed could only have completed together with the new ones.
_RESCAN = 3

#: Default cap on one buffered event; an upstream that never ends its event is broken.
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024


class SSEEvent(NamedTuple):
    """One event: its exact bytes and its joined ``data`` field (None if it has none)."""

    raw: bytes
    data: bytes | None


class SSEEventTooLarge(ValueError):
    """More than ``max_event_bytes`` arrived without the end of an event."""


def _parse_data(raw: bytes) -> bytes | None:
    parts: list[bytes] = []
    for line in raw.splitlines():  # bytes.splitlines splits on exactly CRLF, LF and CR
        if not line or line[0] == 0x3A:  # blank line or ":" comment
            continue
        name, _, value = line.partition(b":")
        if name == b"data":
            parts.append(value[1:] if value[:1] == b" " else value)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else b"\n".join(parts)


def _event_lf(raw: bytes) -> SSEEvent:
    # The usual OpenAI event is exactly b"data: <json>\n\n"; skip the general parse for it.
    if raw.startswith(b"data: ") and raw.find(b"\n") == len(raw) - 2:
        return SSEEvent(raw, raw[6:-2])
    return SSEEvent(raw, _parse_data(raw))


class SSESplitter:
    """Incremental SSE splitter for one stream. Not thread-safe; one per stream."""

    __slots__ = ("_buf", "_max_event_bytes", "_saw_cr", "_scan_from")

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._buf = bytearray()  # bytes received but not yet returned as an event
        self._scan_from = 0  # offset in _buf before which no event end can start
        self._saw_cr = False  # once a CR is seen, use the general (regex) scanner
        self._max_event_bytes = max_event_bytes

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Add bytes; return the events they complete, in order."""
        if not self._saw_cr and _CR in data:
            self._saw_cr = True
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data  # common case: nothing pending, so slice the input without copying
        events, consumed = self._scan(buf, final=False)
        if buf is self._buf:
            del self._buf[:consumed]
        else:
            self._buf[:] = data[consumed:]
        self._scan_from = max(0, len(self._buf) - _RESCAN)
        if len(self._buf) > self._max_event_bytes:
            raise SSEEventTooLarge(f"SSE event exceeds {self._max_event_bytes} bytes")
        return events

    def flush(self) -> list[SSEEvent]:
        """End of stream: return the remaining events and reset the splitter.

        A trailing CR is now known to be a line end. A final event that lacks its blank
        line is returned (``raw`` without terminator) only if it has a ``data`` field;
        anything else left over is dropped.
        """
        buf = bytes(self._buf)
        events, consumed = self._scan(buf, final=True)
        rest = buf[consumed:]
        self._buf.clear()
        self._scan_from = 0
        self._saw_cr = False
        if rest:
            data = _parse_data(rest)
            if data is not None:
                events.append(SSEEvent(rest, data))
        return events

    def _scan(self, buf: bytes | bytearray, *, final: bool) -> tuple[list[SSEEvent], int]:
        """Cut complete events off the front of ``buf``; return them and the bytes used."""
        if not self._saw_cr:
            return self._scan_lf(buf)
        events: list[SSEEvent] = []
        start, n = 0, len(buf)
        search_from = self._scan_from if buf is self._buf else 0
        while start < n:
            first = buf[start]
            if first == _LF:  # a blank line right at the start: a stray terminator
                end = start + 1
            elif first == _CR:
                if start + 1 < n:
                    end = start + 2 if buf[start + 1] == _LF else start + 1
                elif final:
                    end = start + 1
                else:
                    break
            else:
                match = _BLANK_LINE.search(buf, max(start, search_from))
                if match is None:
                    break
                end = match.end()
                if end == n and buf[end - 1] == _CR and not final:
                    break  # the CR may be half of a CRLF still in flight
            raw = bytes(buf[start:end])
            events.append(SSEEvent(raw, _parse_data(raw)))
            start = end
        return events, start

    def _scan_lf(self, buf: bytes | bytearray) -> tuple[list[SSEEvent], int]:
        events: list[SSEEvent] = []
        start, n = 0, len(buf)
        search_from = self._scan_from if buf is self._buf else 0
        while start < n:
            if buf[start] == _LF:  # a blank line right at the start: a stray terminator
                end = start + 1
            else:
                # A blank line is "\n\n" at or after the event's first byte; the first "\n"
                # cannot sit before ``start`` because ``buf[start]`` is not a terminator.
                found = buf.find(b"\n\n", max(start, search_from))
                if found < 0:
                    break
                end = found + 2
            events.append(_event_lf(bytes(buf[start:end])))
            start = end
        return events, start
