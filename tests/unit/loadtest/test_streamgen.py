"""The stream generator's body readers: chunk framing and the markers it looks for."""

from __future__ import annotations

from loadtest.bench.streamgen import Dechunker, _Markers


def test_chunked_framing_is_decoded_across_reads() -> None:
    body = Dechunker()
    wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n"
    out = b"".join(body.feed(wire[i : i + 3]) for i in range(0, len(wire), 3))
    assert out == b"hello, world"
    assert body.finished


def test_markers_split_across_pieces_are_found() -> None:
    markers = _Markers()
    for piece in (b'data: {"choices": []}\n\ndata: [DO', b"NE]\n\n"):
        markers.feed(piece)
    assert markers.done
    assert markers.error == b""
    markers = _Markers()
    markers.feed(b'data: {"err')
    markers.feed(b'or": {"message": "upstream failed"}}\n\n')
    assert markers.error.startswith(b'data: {"error": {"message": "upstream failed"}}')
    assert not markers.done
