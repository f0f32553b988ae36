"""The native load generator: its output parser, and the C program in closed loop against
servers on loopback (skipped where there is no C compiler)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.bench.cli import SCENARIOS, request_body
from loadtest.bench.loadgen import Spec, build_request
from loadtest.bench.native_gen import SOURCE, parse, run_native
from loadtest.bench.native_mock import chat_plans, compile_c, start_native_mock
from loadtest.bench.processes import MODEL, Server, start_mock


def test_parse_reads_results_errors_and_the_summary() -> None:
    figures = parse(["R 1500 240000", "R 2000 241000", "E 3 status 500",
                     "S 3 1 0.25 8.0 100 0.2 0"])
    assert figures["ttfbs"] == [0.0015, 0.002]
    assert figures["latencies"] == [0.24, 0.241]
    assert figures["error_samples"] == ["3x status 500"]
    assert (figures["errors"], figures["shed"], figures["gen_cpu_s"]) == (3, 1, 0.25)
    assert (figures["window_s"], figures["unfinished"]) == (8.0, 100)
    with pytest.raises(RuntimeError):
        parse(["R 1 2"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler")
    path: Path = tmp_path_factory.mktemp("gen")
    return path


@pytest.fixture(scope="module")
def binary(workdir: Path) -> str:
    built = compile_c(SOURCE, workdir)
    assert built is not None  # a compiler is there: the source must build
    return str(built)


@pytest.fixture(scope="module")
def native_mock(workdir: Path) -> Iterator[Server]:
    built = compile_c(Path(SOURCE).with_name("native_mock.c"), workdir)
    assert built is not None
    server = start_native_mock(built, workdir,
                               chat_plans(SCENARIOS, lambda n: request_body(n, MODEL)))
    yield server
    server.stop()


def spec(server: Server, scenario: str, key: str | None = "sk-x", **extra: object) -> Spec:
    request = build_request("127.0.0.1", server.port, "/v1/chat/completions", key,
                            request_body(scenario, MODEL))
    return Spec(host="127.0.0.1", port=server.port, request=request, concurrency=4,
                duration_s=0.6, warmup_s=0.2, keep_samples=True, **extra)  # type: ignore[arg-type]


def test_closed_loop_of_timed_streams(binary: str, native_mock: Server) -> None:
    result = run_native(binary, spec(native_mock, "realistic", ramp_s=0.1))
    assert result["errors"] == 0, result["error_samples"]
    # Four connections, 240 ms streams, a 0.6 s window: a couple of rounds each.
    assert 4 <= result["completed"] <= 16
    assert all(240 <= v < 1000 for v in result["latencies_ms"])
    # The first body bytes (the role event) come with the head, before the first token.
    assert all(0 <= v < 50 for v in result["ttfbs_ms"])
    assert result["unfinished"] == 4


def test_responses_of_every_framing_against_the_python_mock(
        binary: str, workdir: Path) -> None:
    server = start_mock(workdir)
    try:
        for scenario in ("nonstream", "stream"):  # Content-Length, then chunked
            result = run_native(binary, spec(server, scenario))
            assert result["errors"] == 0, result["error_samples"]
            assert result["completed"] > 10
        # A missing key is a 401 with a JSON body: counted as an error, and the loop
        # goes on over the same connections.
        result = run_native(binary, spec(server, "nonstream", key=None))
        assert result["completed"] == 0
        assert result["errors"] > 10
        assert result["error_samples"][0].endswith("status 401")
    finally:
        server.stop()


def test_an_unreachable_server_is_reported_not_hung(binary: str, workdir: Path) -> None:
    from loadtest.bench.processes import free_port

    port = free_port()
    request = build_request("127.0.0.1", port, "/v1/chat/completions", None, b"{}")
    result = run_native(binary, Spec(host="127.0.0.1", port=port, request=request,
                                     concurrency=2, duration_s=0.3, warmup_s=0.0))
    assert result["completed"] == 0
    assert result["errors"] > 0
    assert result["error_samples"][0].endswith("connect failed")
