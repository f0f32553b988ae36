"""``python -m loadtest.bench``: start the servers, run every cell, print the table.

For each scenario and concurrency the same load runs against each target in turn —
``direct`` (the mock), ``relay`` (the bare relay), ``gateway`` and optionally ``compare``
(another OpenAI-compatible proxy) — each cell in a fresh generator process. Must not
import ``proxy``, ``workers`` or ``store``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from loadtest.bench.native_gen import SOURCE as NATIVE_GEN
from loadtest.bench.native_mock import build, chat_plans, compile_c, start_native_mock
from loadtest.bench.processes import (
    MODEL,
    UPSTREAM_KEY,
    Server,
    add_settings_option,
    reachable_tmp_dir,
    start_gateway,
    start_mock,
    start_relay,
)
from loadtest.bench.stats import (
    Cell,
    busiest_share,
    format_table,
    format_versus,
    pool_rounds,
    read_cpu_ticks,
)
from loadtest.self_signed import write_pem

SCENARIOS: dict[str, dict[str, Any]] = {
    "nonstream": {"stream": False, "mock": {"chunks": 20, "ttft_ms": 0, "chunk_delay_ms": 0}},
    "stream": {"stream": True, "mock": {"chunks": 20, "ttft_ms": 0, "chunk_delay_ms": 0}},
    "realistic": {"stream": True, "mock": {"chunks": 20, "ttft_ms": 50, "chunk_delay_ms": 10}},
}
TARGETS = ("direct", "relay", "gateway", "compare")


@dataclass
class Target:
    name: str
    host: str
    port: int
    prefix: str  # path before /chat/completions, e.g. "/v1"
    key: str | None
    model: str
    watch: dict[str, int]
    serving: str | None  # the watched name whose CPU is "cpu-ms/req"


def request_body(scenario: str, model: str) -> bytes:
    shape = SCENARIOS[scenario]
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the benchmark please"}],
        "mock": shape["mock"],
    }
    if shape["stream"]:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str, allowed: tuple[str, ...] | list[str]) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        if name not in allowed:
            raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(allowed)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description="Benchmark the gateway against the mock upstream and a bare relay.",
    )
    parser.add_argument("--concurrency", default="1,10,100,1000", help="comma-separated")
    parser.add_argument("--duration-s", type=float, default=5.0, help="measured s per cell")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured s per cell")
    parser.add_argument("--scenarios", default="nonstream,stream,realistic")
    parser.add_argument("--targets", default="direct,relay,gateway")
    parser.add_argument("--compare-url", help="another OpenAI-compatible proxy, e.g. "
                        "http://127.0.0.1:4000/v1 (adds the 'compare' target)")
    parser.add_argument("--compare-key", help="bearer key for --compare-url")
    parser.add_argument("--compare-model", default=MODEL)
    parser.add_argument("--compare-pid", type=int, help="pid of that proxy, for its CPU/RSS")
    parser.add_argument("--mock-port", type=int, help="fixed mock port (to point --compare-url's"
                        " proxy at it); default: a free port")
    parser.add_argument("--mock", choices=("native", "python"), default="native",
                        help="the upstream: the Python mock's answers replayed by a small C"
                        " server (default; the Python mock when no C compiler is found), or"
                        " the Python mock itself")
    parser.add_argument("--mock-tls", action="store_true",
                        help="the Python mock over https (a self-signed certificate the"
                        " gateway is told to trust): measures reading TLS upstreams; the"
                        " generator speaks plain HTTP, so only the gateway target")
    parser.add_argument("--gen", choices=("native", "python"), default="native",
                        help="the load generator: the closed loop in C (default; the Python"
                        " one when no C compiler is found), or in Python")
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized smoke run: concurrency 1,10, 1 s cells")
    parser.add_argument("--json", dest="json_out", help="also write the results here")
    parser.add_argument("--gateway-workers", type=int, default=1,
                        help="run the gateway as `serve --workers N`")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each cell N times, the targets taking turns, and pool"
                        " the samples (steadier percentiles on a noisy machine)")
    parser.add_argument("--ramp-share", type=float, default=0.5,
                        help="clients start spread over this share of the warm-up, as users"
                        " arrive (0: all at once, which keeps timed streams in step)")
    add_settings_option(parser, "AIRGATE_OVERLOAD_LAG_MS=0")
    args = parser.parse_args(argv)
    if not 0 <= args.ramp_share <= 1:
        parser.error("--ramp-share must be between 0 and 1")
    if args.quick:
        args.concurrency, args.duration_s, args.warmup_s = "1,10", 1.0, 0.3
    try:
        args.concurrency = _ints(args.concurrency)
        args.scenarios = _names(args.scenarios, list(SCENARIOS))
        args.targets = _names(args.targets, TARGETS)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.compare_url and "compare" not in args.targets:
        args.targets.append("compare")
    if "compare" in args.targets and not args.compare_url:
        parser.error("the compare target needs --compare-url")
    if args.mock_tls and args.targets != ["gateway"]:
        parser.error("--mock-tls measures the gateway alone (--targets gateway)")
    return args


def run_cell(target: Target, scenario: str, concurrency: int, args: argparse.Namespace,
             *, keep_samples: bool = False) -> Cell:
    from loadtest.bench.loadgen import build_request

    path = f"{target.prefix}/chat/completions"
    request = build_request(target.host, target.port, path, target.key,
                            request_body(scenario, target.model))
    spec = {
        "host": target.host, "port": target.port, "request": request.decode("latin-1"),
        "concurrency": concurrency, "duration_s": args.duration_s,
        "warmup_s": args.warmup_s, "watch": target.watch, "keep_samples": keep_samples,
        "ramp_s": args.warmup_s * getattr(args, "ramp_share", 0.0),
        "native_gen": getattr(args, "native_gen", None),
        "rss_pid": (target.watch.get(target.serving)
                    or target.watch.get(target.serving + "+tree")) if target.serving else None,
    }
    budget = args.duration_s + args.warmup_s + 60
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench.loadgen", json.dumps(spec)],
        capture_output=True, timeout=budget, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.decode()[-2000:]}")
    raw = json.loads(done.stdout)
    nan = math.nan
    cell = Cell(
        scenario=scenario, concurrency=concurrency, target=target.name,
        rps=raw["completed"] / raw["window_s"], completed=raw["completed"],
        errors=raw["errors"], shed=raw.get("shed", 0), window_s=raw["window_s"],
        p50_ms=raw["p50_ms"] or nan, p99_ms=raw["p99_ms"] or nan,
        ttfb_p50_ms=raw["ttfb_p50_ms"] or nan, ttfb_p99_ms=raw["ttfb_p99_ms"] or nan,
        gen_cpu_s=raw["gen_cpu_s"], peak_rss_mib=raw["peak_rss_mib"],
        process_cpu_s=raw["process_cpu_s"], error_samples=raw["error_samples"],
        unfinished=raw["unfinished"],
        unfinished_older_than_window=raw["unfinished_older_than_window"],
        oldest_unfinished_s=raw["oldest_unfinished_s"],
        latencies_ms=raw.get("latencies_ms", []), ttfbs_ms=raw.get("ttfbs_ms", []),
    )
    serving = target.serving
    if serving and serving in cell.process_cpu_s and cell.completed:
        cell.cpu_ms_per_req = 1000 * cell.process_cpu_s[serving] / cell.completed
    return cell


SETTLE_SHARE = 0.05  # a server busier than this (of one core) has work left over
SETTLE_WINDOW_S = 0.5
SETTLE_MAX_S = 30.0


def settle(pids: list[int],
           ticks: Callable[[int], int | None] = read_cpu_ticks) -> float:
    """Wait until no server process is still busy with an earlier cell's work (a server
    that fell behind at concurrency 1000 goes on working after its generator is gone,
    and would take CPU from the next target's cell). ``ticks`` reads a pid's CPU
    (``read_tree_cpu_ticks`` for a supervisor and its workers). Returns the seconds
    waited."""
    started = time.monotonic()
    while time.monotonic() - started < SETTLE_MAX_S:
        before = {pid: ticks(pid) for pid in pids}
        time.sleep(SETTLE_WINDOW_S)
        after = {pid: ticks(pid) for pid in pids}
        if busiest_share(before, after, SETTLE_WINDOW_S) <= SETTLE_SHARE:
            break
    return time.monotonic() - started


def measure(targets: list[Target], servers: list[int], scenario: str, concurrency: int,
            args: argparse.Namespace) -> list[Cell]:
    """One cell per target: ``args.rounds`` windows each, the targets taking turns, each
    after the servers are idle, pooled."""
    rounds: dict[str, list[Cell]] = {t.name: [] for t in targets}
    for number in range(1, args.rounds + 1):
        for target in targets:
            waited = settle(servers)
            if waited > 2 * SETTLE_WINDOW_S:
                print(f"  (waited {waited:.1f} s for the servers to finish the last cell's"
                      " work)", flush=True)
            cell = run_cell(target, scenario, concurrency, args, keep_samples=args.rounds > 1)
            rounds[target.name].append(cell)
            note = f"  errors: {'; '.join(cell.error_samples)}" if cell.errors else ""
            turn = f" [{number}/{args.rounds}]" if args.rounds > 1 else ""
            print(f"  {scenario:>9} c={concurrency:<5} {target.name:>8}{turn}: "
                  f"{cell.rps:9,.1f} req/s  p50 {cell.p50_ms:7.1f} ms"
                  f"  ttfb p99 {cell.ttfb_p99_ms:7.1f} ms{note}", flush=True)
    return [pool_rounds(rounds[t.name]) for t in targets]


def format_cpu(cells: list[Cell]) -> str:
    """Each process's CPU in each cell, as % of one core (the machine may have few cores)."""
    lines = ["CPU % of one core during each cell's window (gen = the load generator;"
             " gen us/req = its own CPU per request); requests unanswered when the window"
             " closed are not in the percentiles"]
    for c in cells:
        parts = [f"gen {100 * c.gen_cpu_share:5.0f}"]
        parts += [f"{n} {100 * s / c.window_s:5.0f}" for n, s in sorted(c.process_cpu_s.items())]
        total = c.gen_cpu_s + sum(c.process_cpu_s.values())
        lines.append(f"  {c.scenario:>9} c={c.concurrency:<5} {c.target:>8}: "
                     + "  ".join(parts) + f"  | total {100 * total / c.window_s:4.0f}"
                     f"  | gen us/req {c.gen_us_per_req:6.0f}"
                     f"  | unanswered at end {c.unfinished}"
                     f" (>{c.window_s:.0f}s: {c.unfinished_older_than_window},"
                     f" oldest {c.oldest_unfinished_s:.1f}s)")
    return "\n".join(lines)


def _compare_target(args: argparse.Namespace) -> Target:
    parts = urlsplit(args.compare_url)
    prefix = parts.path.rstrip("/")
    if not prefix.endswith("/v1"):
        prefix += "/v1"
    watch = {"compare": args.compare_pid} if args.compare_pid else {}
    return Target("compare", parts.hostname or "127.0.0.1", parts.port or 80, prefix,
                  args.compare_key, args.compare_model, watch,
                  "compare" if args.compare_pid else None)


def start_bench_mock(workdir: Path, kind: str, port: int | None = None) -> Server:
    """The native mock when it can be built (and ``kind`` is "native"), else the Python
    one."""
    binary = build(workdir) if kind == "native" else None
    if binary is None:
        return start_mock(workdir, port)
    plans = chat_plans(SCENARIOS, lambda name: request_body(name, MODEL))
    return start_native_mock(binary, workdir, plans, port)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = reachable_tmp_dir("airgate-bench-")
    cells: list[Cell] = []
    started = time.monotonic()
    with ExitStack() as stack:
        args.native_gen = None
        if args.gen == "native":
            binary = compile_c(NATIVE_GEN, workdir)
            args.native_gen = str(binary) if binary else None
        print(f"load generator: {'native' if args.native_gen else 'python'}", flush=True)
        upstream_env: dict[str, str] = {}
        if args.mock_tls:
            cert, key = write_pem(workdir)
            mock = start_mock(workdir, args.mock_port, tls=(cert, key))
            mock_url = f"https://localhost:{mock.port}"
            upstream_env["SSL_CERT_FILE"] = str(cert)  # the gateway trusts it
        else:
            mock = start_bench_mock(workdir, args.mock, args.mock_port)
            mock_url = mock.url
        stack.callback(mock.stop)
        print(f"mock upstream  {mock_url}/v1  (pid {mock.pid}, {mock.name})", flush=True)
        targets: list[Target] = []
        for name in args.targets:
            if name == "direct":
                targets.append(Target("direct", "127.0.0.1", mock.port, "/v1", UPSTREAM_KEY,
                                      MODEL, {"mock": mock.pid}, "mock"))
            elif name == "relay":
                relay = start_relay(workdir, mock.url)
                stack.callback(relay.stop)
                print(f"bare relay     {relay.url}/v1  (pid {relay.pid})", flush=True)
                targets.append(Target("relay", "127.0.0.1", relay.port, "/v1", None, MODEL,
                                      {"relay": relay.pid, "mock": mock.pid}, "relay"))
            elif name == "gateway":
                gateway = start_gateway(workdir, mock_url, args.gateway_workers,
                                        settings={**dict(args.set), **upstream_env})
                stack.callback(shutil.rmtree, gateway.data_dir, True)
                stack.callback(gateway.stop)
                watch = gateway.watch(mock)
                print(f"gateway        {gateway.server.url}/v1  (pid {gateway.server.pid},"
                      f" postgres {gateway.postmaster_pid()})", flush=True)
                targets.append(Target("gateway", "127.0.0.1", gateway.server.port, "/v1",
                                      gateway.api_key, MODEL, watch, "gateway"))
            else:
                targets.append(_compare_target(args))
        servers = sorted({pid for t in targets for pid in t.watch.values()})
        for scenario in args.scenarios:
            for concurrency in args.concurrency:
                cells += measure(targets, servers, scenario, concurrency, args)
    pooled = f"; {args.rounds} rounds per cell, samples pooled" if args.rounds > 1 else ""
    print(f"\nbenchmark took {time.monotonic() - started:.0f} s; cells of {args.duration_s:g} s"
          f" after {args.warmup_s:g} s warm-up{pooled}; latencies from request sent to last"
          " byte\n")
    print(format_table(cells))
    for name in ("gateway", "compare"):
        if any(c.target == name for c in cells) and any(c.target == "relay" for c in cells):
            print("\n" + format_versus(cells, name, "relay"))
    print("\n" + format_cpu(cells))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([c.as_json() for c in cells], indent=2))
    if any(c.errors for c in cells):
        print(f"\nsome cells had errors (see the err column); server logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
