"""The native mock: the Python mock's answers, replayed by a small C server.

The Python mock (``loadtest.mock_upstream``) costs about two thirds of a core at the
realistic scenario's ~400 requests/s, on the same two cores as the gateway it is there to
measure; its busy passes also make its own time to first byte jump (p99 16 to 35 ms). The
native mock answers with the same bytes at the same offsets from each request's arrival:
:func:`capture` runs the Python mock's ASGI app under trio's ``MockClock`` and records
each part it sends and when, and ``native_mock.c`` replays them. Each request gets the
first plan whose markers (the request line, the scenario's ``"mock"`` object, whether it
streams) all occur in it.

Built with the system's C compiler on first use (``cc -O2``, into the run's work folder);
:func:`build` returns None when there is none, and the bench then uses the Python mock.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import trio
import trio.testing

from loadtest.bench.processes import Server, free_port, launch
from loadtest.mock_shapes import MockConfig
from loadtest.mock_upstream import MockUpstream

SOURCE = Path(__file__).with_name("native_mock.c")
_REASON = 'HTTP/1.1 {} \r\n'


@dataclass(frozen=True)
class Plan:
    markers: tuple[bytes, ...]
    parts: tuple[tuple[int, bytes], ...]  # (microseconds after the request, framed bytes)


def receive_once(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI ``receive`` that gives ``body`` whole, then waits (a client that stays)."""
    given = False

    async def receive() -> dict[str, Any]:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    return receive


async def _record(method: str, path: str, body: bytes, key: str) -> Plan:
    app = MockUpstream(MockConfig())
    receive = receive_once(body)
    head: list[bytes] = []
    parts: list[tuple[int, bytes]] = []
    chunked = False
    start = trio.current_time()

    def add(data: bytes) -> None:
        due = round((trio.current_time() - start) * 1e6)
        if parts and parts[-1][0] == due:
            parts[-1] = (due, parts[-1][1] + data)
        else:
            parts.append((due, data))

    async def send(message: dict[str, Any]) -> None:
        nonlocal chunked
        if message["type"] == "http.response.start":
            names = {name.lower() for name, _ in message["headers"]}
            chunked = b"content-length" not in names
            lines = [_REASON.format(message["status"]).encode()]
            lines += [name + b": " + value + b"\r\n" for name, value in message["headers"]]
            if chunked:
                lines.append(b"transfer-encoding: chunked\r\n")
            head.append(b"".join(lines) + b"\r\n")
            add(head[0])
            return
        data = message.get("body", b"")
        more = message.get("more_body", False)
        if chunked:
            framed = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
            add(framed + (b"" if more else b"0\r\n\r\n"))
        else:
            add(data)

    scope = {"type": "http", "method": method, "path": path, "http_version": "1.1",
             "headers": [(b"authorization", b"Bearer " + key.encode())]}
    await app(scope, receive, send)
    return Plan((), tuple(parts))


def capture(method: str, path: str, body: bytes, markers: tuple[bytes, ...],
            key: str = "sk-bench") -> Plan:
    """What the Python mock sends for this request, and when (its sleeps take no time)."""
    plan = trio.run(_record, method, path, body, key,
                    clock=trio.testing.MockClock(autojump_threshold=0))
    return Plan(markers, plan.parts)


def chat_plans(shapes: dict[str, dict[str, Any]], body_of: Callable[[str], bytes]) -> list[Plan]:
    """One plan per scenario (its request body from ``body_of``), streams first: their
    ``"mock"`` objects can be the same as a non-streaming one's. Then the model list."""
    plans: list[Plan] = []
    for stream in (True, False):
        for name, shape in shapes.items():
            if shape["stream"] is not stream:
                continue
            markers = [b"POST /v1/chat/completions ", b'"mock":' + orjson.dumps(shape["mock"])]
            if stream:
                markers.append(b'"stream":true')
            plans.append(capture("POST", "/v1/chat/completions", body_of(name),
                                 tuple(markers)))
    plans.append(capture("GET", "/v1/models", b"", (b"GET /v1/models ",)))
    return plans


def plan_file(plans: list[Plan]) -> bytes:
    """The C server's plan file: little-endian u32 counts and lengths."""
    out = [struct.pack("<I", len(plans))]
    for plan in plans:
        out.append(struct.pack("<I", len(plan.markers)))
        out += [struct.pack("<I", len(m)) + m for m in plan.markers]
        out.append(struct.pack("<I", len(plan.parts)))
        out += [struct.pack("<II", due, len(data)) + data for due, data in plan.parts]
    return b"".join(out)


def compile_c(source: Path, workdir: Path) -> Path | None:
    """Compile ``source`` into ``workdir`` (``cc -O2``); None, and why (printed), when
    there is no C compiler or it fails."""
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        print(f"{source.stem}: no C compiler here; using the Python one instead", flush=True)
        return None
    binary = workdir / source.stem
    done = subprocess.run([compiler, "-O2", "-Wall", "-o", str(binary), str(source)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"{source.stem}: {compiler} failed; using the Python one instead\n"
              f"{done.stderr}", flush=True)
        return None
    return binary


def build(workdir: Path) -> Path | None:
    """The native mock's binary, or None (the bench then uses the Python mock)."""
    return compile_c(SOURCE, workdir)


def start_native_mock(binary: Path, workdir: Path, plans: list[Plan],
                      port: int | None = None) -> Server:
    path = workdir / "native_mock.plans"
    path.write_bytes(plan_file(plans))
    port = port or free_port()
    return launch("native-mock", [str(binary), str(port), str(path)], port, workdir)
