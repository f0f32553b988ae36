"""The native mock: what it captures from the Python mock, its plan file, and the C server
replaying it over loopback (skipped where there is no C compiler)."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.bench.cli import SCENARIOS, request_body
from loadtest.bench.loadgen import build_request
from loadtest.bench.native_mock import (
    Plan,
    build,
    capture,
    chat_plans,
    plan_file,
    start_native_mock,
)
from loadtest.bench.processes import MODEL, Server


def dechunk(data: bytes) -> bytes:
    """The body of a chunked response (its head already removed)."""
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert data == b"\r\n"
            return out
        out += data[:size]
        assert data[size : size + 2] == b"\r\n"
        data = data[size + 2 :]


def split_head(data: bytes) -> tuple[bytes, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def events(body: bytes) -> list[bytes]:
    return [e[6:] for e in body.split(b"\n\n") if e.startswith(b"data: ")]


def test_realistic_capture_has_the_scenarios_schedule_and_a_whole_stream() -> None:
    plan = capture("POST", "/v1/chat/completions", request_body("realistic", MODEL), (b"x",))
    # The head and the role event at once; 20 pieces 50 ms, 60 ms, ..., 240 ms after.
    assert [due for due, _ in plan.parts] == [0] + [50_000 + 10_000 * i for i in range(20)]
    head, body = split_head(b"".join(data for _, data in plan.parts))
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in head
    stream = events(dechunk(body))
    assert stream[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in stream[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) == 20
    assert chunks[-1]["usage"]["completion_tokens"] == 20


def test_non_stream_capture_is_one_json_answer_with_its_length() -> None:
    plan = capture("POST", "/v1/chat/completions", request_body("nonstream", MODEL), (b"x",))
    [(due, data)] = plan.parts
    head, body = split_head(data)
    assert due == 0
    assert f"content-length: {len(body)}".encode() in head
    assert json.loads(body)["usage"]["completion_tokens"] == 20


def test_streams_are_matched_before_the_non_stream_plan_with_the_same_mock_object() -> None:
    plans = chat_plans(SCENARIOS, lambda name: request_body(name, MODEL))
    stream_at = [i for i, p in enumerate(plans) if b'"stream":true' in p.markers]
    non_stream_at = [i for i, p in enumerate(plans)
                     if p.markers[0].startswith(b"POST") and b'"stream":true' not in p.markers]
    assert len(stream_at) == 2
    assert len(non_stream_at) == 1
    assert max(stream_at) < min(non_stream_at)
    assert plans[-1].markers == (b"GET /v1/models ",)


def test_plan_file_layout() -> None:
    plans = [Plan((b"ab", b"c"), ((0, b"xyz"), (7, b""))), Plan((), ((1, b"q"),))]
    data = plan_file(plans)

    def u32(at: int) -> int:
        value: int = struct.unpack_from("<I", data, at)[0]
        return value

    assert u32(0) == 2
    assert (u32(4), u32(8), data[12:14]) == (2, 2, b"ab")
    assert (u32(14), data[18:19]) == (1, b"c")
    assert u32(19) == 2
    assert (u32(23), u32(27), data[31:34]) == (0, 3, b"xyz")
    assert (u32(34), u32(38)) == (7, 0)
    assert (u32(42), u32(46), u32(50), u32(54), data[58:59]) == (0, 1, 1, 1, b"q")
    assert len(data) == 59


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list[Plan]]]:
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler")
    workdir: Path = tmp_path_factory.mktemp("native")
    binary = build(workdir)
    assert binary is not None  # a compiler is there: the source must build
    plans = chat_plans(SCENARIOS, lambda name: request_body(name, MODEL))
    server = start_native_mock(binary, workdir, plans)
    yield server, plans
    server.stop()


def read_until(sock: socket.socket, done: bytes) -> bytes:
    data = b""
    while not data.endswith(done):
        part = sock.recv(65536)
        assert part, data
        data += part
    return data


def test_native_mock_replays_each_scenario_on_one_connection(
        native: tuple[Server, list[Plan]]) -> None:
    server, plans = native
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        for name, plan in (("stream", plans[0]), ("realistic", plans[1])):
            sock.sendall(build_request("127.0.0.1", server.port, "/v1/chat/completions",
                                       "sk-x", request_body(name, MODEL)))
            expected = b"".join(data for _, data in plan.parts)
            assert read_until(sock, b"0\r\n\r\n") == expected
        sock.sendall(build_request("127.0.0.1", server.port, "/v1/chat/completions", "sk-x",
                                   request_body("nonstream", MODEL)))
        expected = plans[2].parts[0][1]
        data = b""
        while len(data) < len(expected):
            data += sock.recv(65536)
        assert data == expected


def test_native_mock_waits_for_each_part(native: tuple[Server, list[Plan]]) -> None:
    server, _ = native
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(build_request("127.0.0.1", server.port, "/v1/chat/completions", "sk-x",
                                   request_body("realistic", MODEL)))
        head = read_until(sock, b"\n\n\r\n")  # the head and the role event
        assert b"data: [DONE]" not in head
        first_piece = sock.recv(65536)
        assert b'"content":"' in first_piece
        assert time.monotonic() - started >= 0.049  # the first token's 50 ms


def test_native_mock_answers_an_unknown_request_with_a_json_404(
        native: tuple[Server, list[Plan]]) -> None:
    server, _ = native
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/nothing HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        head, _, body = read_until(sock, b"}}").partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404")
        assert f"content-length: {len(body)}".encode() in head
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
        # The connection stays usable.
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_until(sock, b"]}").split(b"\r\n", 1)[0] == b"HTTP/1.1 200 "
