"""The floor server: hypercorn answering the stream scenario's canned answer, whole or one
event per message, and the bench reading its CPU as the ``compare`` target."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import orjson
import pytest
import trio

from loadtest.bench.floor import Floor, capture_answer
from loadtest.bench.processes import free_port


async def _call(app: Floor, method: str, path: str) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": method, "path": path}, receive, send)
    return sent


def test_the_captured_answer_is_the_mocks_whole_stream() -> None:
    headers, parts = capture_answer()
    assert (b"content-type", b"text/event-stream; charset=utf-8") in headers
    events = b"".join(parts).split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) == 20
    assert chunks[-1]["usage"]["completion_tokens"] == 20


@pytest.mark.parametrize("split", [False, True])
async def test_the_floor_sends_the_answer_whole_or_an_event_per_message(split: bool) -> None:
    headers, parts = await trio.to_thread.run_sync(capture_answer)
    app = Floor(headers, parts if split else [b"".join(parts)])
    sent = await _call(app, "POST", "/v1/chat/completions")
    assert sent[0] == {"type": "http.response.start", "status": 200, "headers": headers}
    bodies = [m["body"] for m in sent[1:]]
    assert len(bodies) == (len(parts) if split else 1) + 1
    assert b"".join(bodies) == b"".join(parts)
    assert bodies[-1] == b""
    assert sent[-1].get("more_body", False) is False
    assert (await _call(app, "GET", "/other"))[0]["status"] == 404


def test_the_bench_reads_the_floors_cpu_as_its_compare_target() -> None:
    port = free_port()
    floor = subprocess.Popen([sys.executable, "-m", "loadtest.bench.floor", "--port", str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert floor.stdout is not None
        assert b"floor listening" in floor.stdout.readline()
        done = subprocess.run(
            [sys.executable, "-m", "loadtest.bench", "--quick", "--targets", "compare",
             "--scenarios", "stream", "--compare-url", f"http://127.0.0.1:{port}/v1",
             "--compare-pid", str(floor.pid)],
            capture_output=True, text=True, timeout=60, check=False,
        )
    finally:
        floor.terminate()
        floor.communicate(timeout=10)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()
            if line.split()[:1] == ["stream"] and len(line.split()) == 19]
    assert [r[2] for r in rows] == ["compare", "compare"]
    for row in rows:
        assert float(row[3].replace(",", "")) > 0, row  # requests/s
        assert float(row[14]) > 0, row  # the floor's CPU-ms per request was read
        assert row[17] == "0", row  # errors
