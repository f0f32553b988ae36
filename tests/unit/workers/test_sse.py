"""SSESplitter: exact parses, and invariance to how the bytes are cut into feeds."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.sse import SSEEvent, SSEEventTooLarge, SSESplitter


def _feed_all(pieces: list[bytes], *, flush: bool = True) -> list[SSEEvent]:
    splitter = SSESplitter()
    events: list[SSEEvent] = []
    for piece in pieces:
        events.extend(splitter.feed(piece))
    if flush:
        events.extend(splitter.flush())
    return events


# -- a deliberately naive reference: one byte at a time, whole input known ------------------


def _ref_data(raw: bytes) -> bytes | None:
    lines: list[bytes] = []
    line = b""
    i = 0
    while i < len(raw):
        c = raw[i : i + 1]
        if c == b"\r":
            lines.append(line)
            line = b""
            i += 2 if raw[i + 1 : i + 2] == b"\n" else 1
        elif c == b"\n":
            lines.append(line)
            line = b""
            i += 1
        else:
            line += c
            i += 1
    if line:
        lines.append(line)
    data: bytes | None = None
    for text in lines:
        if text == b"" or text.startswith(b":"):
            continue
        if b":" in text:
            colon = text.index(b":")
            name, value = text[:colon], text[colon + 1 :]
            if value.startswith(b" "):
                value = value[1:]
        else:
            name, value = text, b""
        if name == b"data":
            data = value if data is None else data + b"\n" + value
    return data


def _reference(stream: bytes, *, include_partial: bool = True) -> list[SSEEvent]:
    events: list[SSEEvent] = []
    start = line_start = i = 0
    while i < len(stream):
        if stream[i : i + 1] in (b"\r", b"\n"):
            end = i + 2 if stream[i : i + 2] == b"\r\n" else i + 1
            if line_start == i:  # an empty line ends the event
                raw = stream[start:end]
                events.append(SSEEvent(raw, _ref_data(raw)))
                start = end
            line_start = i = end
        else:
            i += 1
    rest = stream[start:]
    if include_partial and rest and _ref_data(rest) is not None:
        events.append(SSEEvent(rest, _ref_data(rest)))
    return events


# -- exact examples -----------------------------------------------------------------------------


def test_openai_stream() -> None:
    stream = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
    assert _feed_all([stream]) == [
        SSEEvent(b'data: {"a":1}\n\n', b'{"a":1}'),
        SSEEvent(b'data: {"b":2}\n\n', b'{"b":2}'),
        SSEEvent(b"data: [DONE]\n\n", b"[DONE]"),
    ]


def test_event_is_returned_as_soon_as_its_blank_line_arrives() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b"data: x\n") == []
    assert splitter.feed(b"\ndata: y") == [SSEEvent(b"data: x\n\n", b"x")]
    assert splitter.feed(b"\n") == []
    assert splitter.feed(b"\n") == [SSEEvent(b"data: y\n\n", b"y")]


def test_multiline_data_and_other_fields() -> None:
    raw = b"event: message\nid: 7\ndata: one\ndata:two\ndata\nretry: 10\n\n"
    assert _feed_all([raw]) == [SSEEvent(raw, b"one\ntwo\n")]


def test_only_one_leading_space_is_stripped() -> None:
    assert _feed_all([b"data:   x \n\n"]) == [SSEEvent(b"data:   x \n\n", b"  x ")]


def test_empty_data_field_is_empty_bytes_not_none() -> None:
    assert _feed_all([b"data:\n\n"]) == [SSEEvent(b"data:\n\n", b"")]


def test_comment_only_event_has_no_data() -> None:
    assert _feed_all([b": ping\n\ndata: x\n\n"]) == [
        SSEEvent(b": ping\n\n", None),
        SSEEvent(b"data: x\n\n", b"x"),
    ]


def test_comment_lines_inside_an_event_are_ignored() -> None:
    raw = b": keep-alive\ndata: x\n: more\n\n"
    assert _feed_all([raw]) == [SSEEvent(raw, b"x")]


def test_stray_blank_lines_are_events_without_data() -> None:
    assert _feed_all([b"\ndata: x\n\n\n"]) == [
        SSEEvent(b"\n", None),
        SSEEvent(b"data: x\n\n", b"x"),
        SSEEvent(b"\n", None),
    ]


def test_crlf_terminators() -> None:
    stream = b"data: a\r\ndata: b\r\n\r\n: c\r\n\r\n"
    assert _feed_all([stream]) == [
        SSEEvent(b"data: a\r\ndata: b\r\n\r\n", b"a\nb"),
        SSEEvent(b": c\r\n\r\n", None),
    ]


def test_cr_terminators() -> None:
    assert _feed_all([b"data: a\rdata: b\r\rdata: c\r\r"]) == [
        SSEEvent(b"data: a\rdata: b\r\r", b"a\nb"),
        SSEEvent(b"data: c\r\r", b"c"),
    ]


def test_mixed_terminators() -> None:
    assert _feed_all([b"data: a\r\n\ndata: b\n\r\n"]) == [
        SSEEvent(b"data: a\r\n\n", b"a"),
        SSEEvent(b"data: b\n\r\n", b"b"),
    ]


def test_trailing_cr_waits_for_the_next_byte() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b"data: a\r\n\r") == []  # the CR may start a CRLF
    assert splitter.feed(b"\n") == [SSEEvent(b"data: a\r\n\r\n", b"a")]
    assert splitter.feed(b"data: b\r\r") == []
    assert splitter.feed(b"x") == [SSEEvent(b"data: b\r\r", b"b")]
    assert splitter.flush() == []  # "x" has no data field


def test_flush_resolves_a_trailing_cr() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b"data: a\r\r") == []
    assert splitter.flush() == [SSEEvent(b"data: a\r\r", b"a")]


def test_flush_returns_a_partial_event_with_data() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b"data: x\n\ndata: tail") == [SSEEvent(b"data: x\n\n", b"x")]
    assert splitter.flush() == [SSEEvent(b"data: tail", b"tail")]
    assert splitter.flush() == []


def test_flush_drops_a_partial_event_without_data() -> None:
    splitter = SSESplitter()
    assert splitter.feed(b": ping\nevent: x") == []
    assert splitter.flush() == []


def test_splitter_is_reusable_after_flush() -> None:
    splitter = SSESplitter()
    splitter.feed(b"data: a\r")
    splitter.flush()
    assert splitter.feed(b"data: b\n\n") == [SSEEvent(b"data: b\n\n", b"b")]


def test_event_too_large() -> None:
    splitter = SSESplitter(max_event_bytes=16)
    assert splitter.feed(b"data: 0123456789") == []
    with pytest.raises(SSEEventTooLarge):
        splitter.feed(b"x")


def test_one_byte_at_a_time_over_a_long_event() -> None:
    payload = b"data: " + b"x" * 5000 + b"\n\n"
    assert _feed_all([payload[i : i + 1] for i in range(len(payload))]) == [
        SSEEvent(payload, b"x" * 5000)
    ]


# -- properties ---------------------------------------------------------------------------------

_ATOMS = [
    b"data: ",
    b"data:",
    b"data",
    b"event: e",
    b": ping",
    b":",
    b" ",
    b'{"x":1}',
    b"[DONE]",
    "\u4e2d".encode(),
    b"\r",
    b"\n",
    b"\r\n",
]
streams = st.lists(st.sampled_from(_ATOMS), max_size=40).map(b"".join)
lf_streams = st.lists(st.sampled_from([a for a in _ATOMS if b"\r" not in a]), max_size=40).map(
    b"".join
)


@st.composite
def split_stream(draw: st.DrawFn, source: st.SearchStrategy[bytes]) -> tuple[bytes, list[bytes]]:
    stream = draw(source)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    return stream, [stream[a:b] for a, b in itertools.pairwise(bounds)]


@given(split_stream(streams))
def test_matches_reference_however_split(case: tuple[bytes, list[bytes]]) -> None:
    stream, pieces = case
    assert _feed_all(pieces) == _reference(stream)


@given(split_stream(lf_streams))
def test_lf_fast_path_matches_reference_however_split(case: tuple[bytes, list[bytes]]) -> None:
    stream, pieces = case
    assert _feed_all(pieces) == _reference(stream)


@given(split_stream(streams))
def test_feeds_return_a_prefix_and_raw_concatenates(case: tuple[bytes, list[bytes]]) -> None:
    stream, pieces = case
    splitter = SSESplitter()
    events: list[SSEEvent] = []
    for piece in pieces:
        events.extend(splitter.feed(piece))
    consumed = b"".join(e.raw for e in events)
    assert stream.startswith(consumed)
    complete = _reference(stream, include_partial=False)
    assert events == complete[: len(events)]
    if b"".join(e.raw for e in complete) == stream and not stream.endswith(b"\r"):
        # The stream ends exactly at an unambiguous blank line: nothing may be held back.
        assert consumed == stream
        assert splitter.flush() == []


@given(st.lists(st.binary(max_size=30).filter(lambda b: b"\r" not in b and b"\n" not in b)))
def test_complete_events_round_trip(payloads: list[bytes]) -> None:
    stream = b"".join(b"data: " + p + b"\n\n" for p in payloads)
    events = _feed_all([stream])
    assert b"".join(e.raw for e in events) == stream
    assert [e.data for e in events] == payloads
