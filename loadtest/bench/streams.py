"""``python -m loadtest.bench.streams``: many concurrent open streams through one gateway.

Checks the target "10,000 concurrent open streams in one gateway process under 1 GiB
RSS, none dropped". Starts the mock upstream and the gateway (one process, its caps on
concurrent and waiting requests raised to fit) as :mod:`loadtest.bench.cli` does, then
ramps up ``--streams`` long streaming chat completions (the mock's per-request ``mock``
shape: ``--chunks`` chunks ``--chunk-delay-ms`` apart) from one or more generator
processes (:mod:`loadtest.bench.streamgen`). Meanwhile it samples the gateway's and the
mock's VmRSS and open fds and the gateway's accept queue and /metrics
(:mod:`loadtest.bench.streamwatch`); at the end it reads their VmHWM, adds up the
outcomes and prints one summary. Exits 1 if any stream was not completed with
``data: [DONE]``, the gateway exited or its peak RSS reached ``--rss-limit-mib``. Must
not import ``proxy``, ``workers`` or ``store``.

Over HTTP/1.1 every stream holds two of the gateway's sockets, its client's and its
upstream's, so 10,000 streams need more than 20,000 open files: this machine's hard
limit is 20,000, and raising it needs ``CAP_SYS_RESOURCE``. ``--http2`` sends the streams
over h2c connections instead, ``--streams-per-connection`` each (hypercorn's default
limit is 100), as clients behind an HTTP/2 proxy or with ``httpx(http2=True)`` do: the
gateway then holds one socket per stream (upstream) and one per hundred (clients).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from loadtest.bench.loadgen import build_request
from loadtest.bench.processes import (
    MODEL,
    add_settings_option,
    reachable_tmp_dir,
    start_gateway,
    start_mock,
)
from loadtest.bench.stats import CLOCK_TICKS, read_cpu_ticks, read_tree_cpu_ticks
from loadtest.bench.streamgen import OK
from loadtest.bench.streamwatch import (
    Watch,
    fd_limit,
    gateway_gauges,
    gateway_log_summary,
    listen_counters,
    proc_kib,
)

# Generator processes open at most this many connections at a time in total: hypercorn's
# listen backlog is 100, and a dropped SYN costs a one-second retransmit.
CONNECT_PARALLEL = 48
# Streams opened per second by default. Faster, on a shared 2-core machine, the gateway's
# accept loop falls behind and its listen backlog (100) overflows.
RAMP_PER_S = 80


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench.streams",
        description="Open many concurrent streams through one gateway process; check its "
                    "RSS and that none is dropped.")
    parser.add_argument("--streams", type=int, default=10_000, help="concurrent streams")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument("--chunk-delay-ms", type=float,
                        help="gap between chunks (default: each stream lasts 1.25 x the"
                             " ramp, at least 1000 ms apart)")
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--ramp-s", type=float,
                        help=f"open the streams evenly over this long (default: "
                             f"{RAMP_PER_S} streams a second, at least 2 s)")
    parser.add_argument("--generators", type=int, default=0,
                        help="generator processes (default: one per 5000 streams)")
    parser.add_argument("--rss-limit-mib", type=float, default=1024.0)
    parser.add_argument("--sample-s", type=float, default=0.5, help="RSS sampling period")
    parser.add_argument("--http2", action="store_true",
                        help="clients speak h2c, many streams per connection")
    parser.add_argument("--streams-per-connection", type=int, default=100,
                        help="with --http2 (hypercorn allows 100 by default)")
    add_settings_option(parser, "AIRGATE_OVERLOAD_LAG_MS=0")
    parser.add_argument("--keep-logs", action="store_true",
                        help="keep the temp dir with the gateway's and the mock's logs")
    args = parser.parse_args(argv)
    if args.streams < 1 or args.chunks < 1:
        parser.error("--streams and --chunks must be at least 1")
    args.generators = args.generators or max(1, math.ceil(args.streams / 5000))
    if args.ramp_s is None:
        args.ramp_s = max(2.0, args.streams / RAMP_PER_S)
    if args.chunk_delay_ms is None:
        args.chunk_delay_ms = max(1000.0, 1250 * args.ramp_s / max(args.chunks - 1, 1))
    return args


def request_body(args: argparse.Namespace) -> bytes:
    return orjson.dumps({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Keep this stream open please"}],
        "stream": True, "stream_options": {"include_usage": True},
        "mock": {"chunks": args.chunks, "ttft_ms": args.ttft_ms,
                 "chunk_delay_ms": args.chunk_delay_ms},
    })


def run_generators(args: argparse.Namespace, port: int, key: str,
                   watch: Watch, workdir: Path) -> list[dict[str, Any]]:
    """Start the generator processes, sample ``watch`` until they end; their results."""
    body = request_body(args)
    request = build_request("127.0.0.1", port, "/v1/chat/completions", key, body)
    stream_s = (args.ttft_ms + args.chunk_delay_ms * max(args.chunks - 1, 0)) / 1000
    timeout_s = stream_s + args.ramp_s + 120
    start_at = time.time() + 1.5 + 0.2 * args.generators  # after the imports
    procs = []
    for first in range(args.generators):
        spec = {
            "host": "127.0.0.1", "port": port, "request": request.decode("latin-1"),
            "first": first, "step": args.generators, "total": args.streams,
            "ramp_s": args.ramp_s, "start_at": start_at, "tick_s": args.sample_s,
            "timeout_s": timeout_s,
            "connect_parallel": max(1, CONNECT_PARALLEL // args.generators),
            "http2": args.http2, "streams_per_connection": args.streams_per_connection,
            "key": key, "body": body.decode(),
        }
        out = (workdir / f"generator-{first}.json").open("w+b")  # no pipe to fill up
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "loadtest.bench.streamgen", json.dumps(spec)],
            stdout=out, stderr=subprocess.STDOUT), out))
    deadline = start_at + timeout_s + 30
    results = []
    try:
        watch.run_while(lambda: any(p.poll() is None for p, _ in procs), args.sample_s,
                        deadline)
        for proc, out in procs:
            proc.wait(max(1.0, deadline - time.time()))
            out.seek(0)
            text = out.read().decode(errors="replace")
            if proc.returncode != 0:
                raise RuntimeError(f"stream generator failed: {text[-2000:]}")
            results.append(json.loads(text.splitlines()[-1]))  # after any warnings
    finally:
        for proc, out in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
    return results


def _mib(kib: int | None) -> float:
    return (kib or 0) / 1024


@dataclass
class Measured:
    """What one run measured, for :func:`report`."""

    results: list[dict[str, Any]]
    watch: Watch
    listen_overflows: dict[str, int]  # namespace-wide counters' growth during the run
    idle_kib: dict[str, int | None]
    hwm_kib: dict[str, int | None]
    cpu_s: dict[str, float]
    wall_s: float
    gateway_alive: bool
    mock_stats: dict[str, Any]
    log_lines: list[str]
    fd_limit: str


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    ticks = {name: read_tree_cpu_ticks(pid) if name == "postgres" else read_cpu_ticks(pid)
             for name, pid in pids.items()}
    return {name: (t or 0) / CLOCK_TICKS for name, t in ticks.items()}


def measure(args: argparse.Namespace, workdir: Path) -> Measured:
    margin = args.streams + max(100, args.streams // 10)
    settings = {"AIRGATE_MAX_WAITING_REQUESTS": str(margin),
                "AIRGATE_UPSTREAM_MAX_CONNECTIONS": str(margin)}
    settings.update(args.set)
    with ExitStack() as stack:
        mock = start_mock(workdir)
        stack.callback(mock.stop)
        gateway = start_gateway(workdir, mock.url, 1, max_concurrency=margin, settings=settings)
        stack.callback(shutil.rmtree, gateway.data_dir, True)
        stack.callback(gateway.stop)
        pids = {"gateway": gateway.server.pid, "mock": mock.pid}
        idle = {name: proc_kib(pid, "VmRSS") for name, pid in pids.items()}
        print(f"mock {mock.url} (pid {mock.pid}), gateway {gateway.server.url}"
              f" (pid {gateway.server.pid}); {args.generators} generator(s); caps (waiting"
              f" requests, upstream connections, key concurrency) set to {margin}"
              + "".join(f"; {name}={value}" for name, value in args.set), flush=True)
        cpu_pids = dict(pids)
        if (postmaster := gateway.postmaster_pid()) is not None:
            cpu_pids["postgres"] = postmaster
        watch = Watch(pids, gateway.server.port, mock.url, gateway.server.url)
        listen0 = listen_counters()
        cpu0, wall0 = _cpu(cpu_pids), time.monotonic()
        results = run_generators(args, gateway.server.port, gateway.api_key, watch, workdir)
        cpu1, wall = _cpu(cpu_pids), time.monotonic() - wall0
        overflows = {k: v - listen0.get(k, 0) for k, v in listen_counters().items()}
        watch.write(workdir / "series.jsonl")
        cpu = {name: cpu1[name] - cpu0[name] for name in cpu_pids}
        cpu["generators"] = sum(r["cpu_s"] for r in results)
        try:
            mock_stats: dict[str, Any] = httpx.get(mock.url + "/_mock/stats", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            mock_stats = {}
        with httpx.Client(base_url=gateway.server.url, timeout=5) as client:
            watch.gauges.update((k, v) for k, v in gateway_gauges(client).items()
                                if k.startswith("shed:"))
        hwm = {name: proc_kib(pid, "VmHWM") for name, pid in pids.items()}
        return Measured(
            results, watch, overflows, idle, hwm,
            cpu, wall, gateway.server.proc.poll() is None, mock_stats,
            gateway_log_summary(gateway.server.log), fd_limit(gateway.server.pid))


def report(args: argparse.Namespace, m: Measured) -> bool:
    """Print the summary; True when the target is met."""
    outcomes: dict[str, int] = {}
    for result in m.results:
        for what, n in result["outcomes"].items():
            outcomes[what] = outcomes.get(what, 0) + n
    ticks = max(len(r["series"]) for r in m.results)
    peak_open = max((sum(r["series"][k] for r in m.results if k < len(r["series"]))
                     for k in range(ticks)), default=0)
    ok = outcomes.get(OK, 0)
    failed = args.streams - ok
    gw_peak = m.hwm_kib["gateway"] or m.watch.rss_kib.get("gateway", 0)
    idle = m.idle_kib["gateway"] or 0
    per_stream = gw_peak / peak_open if peak_open else math.nan
    marginal = (gw_peak - idle) / peak_open if peak_open else math.nan
    print(f"\nmany open streams: {args.streams} streams of {args.chunks} chunks"
          f" {args.chunk_delay_ms:g} ms apart, ramped over {args.ramp_s:g} s;"
          f" streaming phase took {m.wall_s:.0f} s")
    print(f"  peak open at once   {peak_open} (200 head seen, body not ended; summed per"
          f" {args.sample_s:g} s tick; the mock saw at most {m.watch.mock_active})")
    print(f"  completed OK        {ok}  (data: [DONE] and a clean end of the body)")
    connections = sum(r["connections"] for r in m.results)
    print(f"  client connections  {connections} ({'HTTP/2, h2c' if args.http2 else 'HTTP/1.1'})")
    print(f"  dropped/failed      {failed}")
    for what, n in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        if what != OK:
            print(f"    {n:6d} x {what}")
    for sample in [s for r in m.results for s in r["samples"]][:6]:
        print(f"      e.g. {sample[:200]}")
    failed_at = sorted(t for r in m.results for t in r["failed_at"])
    if failed_at:
        start = min(r["start_at"] for r in m.results)
        print(f"    failures between {failed_at[0] - start:.1f} s and"
              f" {failed_at[-1] - start:.1f} s after the ramp started")
    print(f"  gateway peak RSS    {_mib(gw_peak):.1f} MiB (VmHWM; {_mib(idle):.1f} MiB idle"
          f" before the run){'' if m.gateway_alive else '  -- THE GATEWAY EXITED'}")
    print(f"  per open stream     {per_stream:.1f} KiB (peak RSS / peak open);"
          f" {marginal:.1f} KiB above idle")
    print(f"  mock peak RSS       {_mib(m.hwm_kib['mock']):.1f} MiB (VmHWM;"
          f" {_mib(m.idle_kib['mock']):.1f} MiB idle), the baseline")
    print(f"  peak open fds       gateway {m.watch.fds.get('gateway')} (its limit"
          f" {m.fd_limit}), mock {m.watch.fds.get('mock')}")
    print(f"  gateway accept queue at most {m.watch.queue} waiting (backlog"
          f" {m.watch.backlog}); listen overflows/SYN drops in the namespace meanwhile:"
          f" {m.listen_overflows.get('ListenOverflows')}/{m.listen_overflows.get('ListenDrops')}")
    gauges = m.watch.gauges
    sheds = ", ".join(f"{k[5:]} {v:.0f}" for k, v in gauges.items() if k.startswith("shed:"))
    print(f"  gateway /metrics    at most {gauges.get('airgate_active_streams', 0):.0f} streams"
          f" open; scheduler lag up to"
          f" {1000 * gauges.get('airgate_scheduler_lag_seconds', 0):.0f} ms (smoothed);"
          f" admission limit down to {gauges.get('airgate_admission_limit', math.inf):g};"
          f" shedding in {m.watch.shedding_samples} of {len(m.watch.series)} samples;"
          f" refused: {sheds or 'none'}")
    cpu = ", ".join(f"{name} {s:.1f}" for name, s in m.cpu_s.items())
    cores = os.cpu_count() or 1
    print(f"  CPU s in the phase  {cpu} ({cores} cores: {cores * m.wall_s:.0f} available); gateway"
          f" {1000 * m.cpu_s['gateway'] / args.streams:.2f} ms per stream")
    for name, key in (("ramp slot -> connected", "connect_ms"), ("request -> 200 head", "head_ms")):
        print(f"  {name:<22} p50/p99/max ms per generator: "
              + "; ".join("/".join(f"{v:.0f}" for v in r[key]) for r in m.results))
    print(f"  mock counters       requests {sum(m.mock_stats.get('requests', {}).values())},"
          f" streams completed {m.mock_stats.get('completed_streams')}, disconnected"
          f" {m.mock_stats.get('disconnected_streams')}, still open"
          f" {m.mock_stats.get('active_streams')}")
    print("  gateway log (warning and up): " + "\n".join(m.log_lines))
    verdict = failed == 0 and _mib(gw_peak) < args.rss_limit_mib and m.gateway_alive
    print(f"\nRESULT: {'PASS' if verdict else 'FAIL'} ({args.streams} streams, {failed} dropped,"
          f" peak {peak_open} open at once, gateway peak RSS {_mib(gw_peak):.0f} MiB,"
          f" limit {args.rss_limit_mib:g} MiB)")
    return verdict


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers
    workdir = reachable_tmp_dir("airgate-streams-")
    verdict = report(args, measure(args, workdir))
    if args.keep_logs:
        print(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    raise SystemExit(0 if verdict else 1)


if __name__ == "__main__":
    main()
