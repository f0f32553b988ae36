"""``python -m loadtest.bench.overload``: does the gateway shed load or queue it?

Target: at twice its capacity the gateway refuses the excess (429/503 with
``retry-after``) instead of queueing it for seconds, so the p99 latency of the requests
it accepts stays within 2x of its p99 at capacity. Starts the mock upstream (the native
mock by default, ``--mock python`` for the Python one) and the gateway (as
:mod:`loadtest.bench.cli` does), finds its capacity R (or takes
``--capacity-rps``), then runs the open-loop generator (:mod:`loadtest.bench.openloop`) at
1.0 x R and ``--factor`` x R. A measurement, not a test: it always exits 0 and prints
PASS or FAIL. Must not import ``proxy``, ``workers`` or ``store``.

Capacity is the highest *sustainable* open-loop rate, not the closed-loop maximum: with
arrivals at exactly the rate a server can at most complete, its queue grows without
bound (a queue at utilisation 1 is unstable), so a p99 "at" that rate only says how long
the run was. The ladder runs open loop at fractions of the closed-loop maximum (c=50)
and takes the highest step the gateway kept up with (see ``sustained``). Near the top
of the ladder one run at a rate may keep up and the next at the same rate not (it did in
two of three runs at 0.9 of the maximum): when the 1x run does not keep up, R was not
the capacity, and the 1x run is repeated at the next lower step that kept up.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from loadtest.bench.cli import SCENARIOS, Target, request_body, run_cell, start_bench_mock
from loadtest.bench.loadgen import build_request
from loadtest.bench.processes import (
    MODEL,
    add_settings_option,
    reachable_tmp_dir,
    start_gateway,
)

CAPACITY_CONCURRENCY = 50
LADDER = (0.5, 0.65, 0.8, 0.9, 1.0)  # fractions of the closed-loop maximum
LADDER_P99_GROWTH = 10.0  # a rung's p99 may be at most this times the lowest rung's
LADDER_DRAIN_S = 1.0  # and what is still queued when the arrivals stop must drain this fast
P99_RATIO_TARGET = 2.0
GEN_CPU_LIMIT = 0.60  # generator share of one core above which it may be the limit
ERROR_LIMIT = 0.01  # errors (timeouts, resets, 5xx other than 503) as a share of arrivals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench.overload",
        description="Open-loop overload check: p99 of accepted requests at factor x capacity"
                    " against p99 at capacity.",
    )
    parser.add_argument("--scenario", choices=["nonstream", "stream"], default="nonstream")
    parser.add_argument("--mock", choices=["native", "python"], default="native",
                        help="the upstream: the Python mock's answers replayed by a small C"
                        " server (default; the Python mock when no C compiler is found), or"
                        " the Python mock itself")
    parser.add_argument("--duration-s", type=float, default=8.0, help="measured s per run")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured s per run")
    parser.add_argument("--capacity-rps", type=float,
                        help="skip the closed-loop capacity measurement and use this R")
    parser.add_argument("--factor", type=float, default=2.0, help="overload as a multiple of R")
    parser.add_argument("--arrival", choices=["uniform", "poisson"], default="uniform",
                        help="evenly spaced arrivals (default) or Poisson")
    parser.add_argument("--max-connections", type=int, default=2000,
                        help="open connections the generator may hold")
    parser.add_argument("--preconnect", type=int, default=100,
                        help="keep-alive connections opened before the first arrival")
    parser.add_argument("--timeout-s", type=float, default=30.0,
                        help="per request, from its scheduled time")
    parser.add_argument("--json", dest="json_out", help="also write the results here")
    add_settings_option(parser, "AIRGATE_OVERLOAD_LAG_MS=25")
    return parser.parse_args(argv)


def measure_capacity(target: Target, args: argparse.Namespace) -> list[float]:
    """The closed-loop maximum (c=50, the cell ``python -m loadtest.bench`` runs), then the
    rungs of the open-loop ladder below it that the gateway sustained, highest first."""
    cell = run_cell(target, args.scenario, CAPACITY_CONCURRENCY, args)
    print(f"closed loop c={CAPACITY_CONCURRENCY}: {cell.rps:,.1f} req/s"
          f"  p50 {cell.p50_ms:.1f} ms  p99 {cell.p99_ms:.1f} ms  errors {cell.errors}"
          f"  gen {100 * cell.gen_cpu_share:.0f}%", flush=True)
    if cell.errors:
        print(f"  capacity errors: {'; '.join(cell.error_samples)}", flush=True)
    kept: list[float] = []
    first_p99 = math.nan
    for fraction in LADDER:
        rate = fraction * cell.rps
        result = run_open_loop(target, rate, args)
        if math.isnan(first_p99):
            first_p99 = result["accepted_p99_ms"] or math.nan
        ok = sustained(result, first_p99)
        print(f"  ladder {fraction:.2f} x = {rate:,.1f}/s: accepted"
              f" {result['accepted_rps']:,.1f}/s, shed {result['shed']}, errors"
              f" {result['errors']}, p99 {_n(result['accepted_p99_ms'])} ms:"
              f" {'kept up' if ok else 'did not keep up'}", flush=True)
        if not ok:
            break
        kept.insert(0, rate)
    return kept or [LADDER[0] * cell.rps]


def sustained(result: dict[str, Any], first_p99_ms: float) -> bool:
    """Whether the gateway kept up with an open-loop run: it answered (nearly) every
    arrival in time, refused next to none, left no backlog (drained within
    ``LADDER_DRAIN_S``) and its p99 stayed within ``LADDER_P99_GROWTH`` times the lowest
    rung's (latency grows with utilisation; a queue that keeps growing shows here)."""
    offered = result["scheduled"] or 1
    p99 = result["accepted_p99_ms"]
    return (result["accepted"] >= 0.98 * offered
            and result["errors"] + result["gen_limited"] <= 0.01 * offered
            and result["shed"] <= 0.01 * offered
            and result["drain_s"] <= LADDER_DRAIN_S
            and p99 is not None and p99 <= LADDER_P99_GROWTH * first_p99_ms)


def run_open_loop(target: Target, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    request = build_request(target.host, target.port, f"{target.prefix}/chat/completions",
                            target.key, request_body(args.scenario, target.model))
    spec = {
        "host": target.host, "port": target.port, "request": request.decode("latin-1"),
        "rate_rps": rate, "duration_s": args.duration_s, "warmup_s": args.warmup_s,
        "arrival": args.arrival, "max_connections": args.max_connections,
        "timeout_s": args.timeout_s, "watch": target.watch, "preconnect": args.preconnect,
    }
    budget = args.warmup_s + args.duration_s + args.timeout_s + 60
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench.openloop", json.dumps(spec)],
        capture_output=True, timeout=budget, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"open-loop generator failed: {done.stderr.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _n(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


_COLUMNS = (("load", 5), ("offered", 8), ("sent/s", 8), ("ok/s", 8), ("shed/s", 8),
            ("err", 5), ("genlim", 6), ("p50ms", 7), ("p90ms", 7), ("p99ms", 8),
            ("maxms", 8), ("ref50", 6), ("ref99", 6), ("r-a%", 5), ("gen%", 5),
            ("gw%", 5), ("mock%", 5), ("pg%", 5), ("conns", 5), ("new", 5), (">1s", 4))


def format_rows(rows: list[tuple[float, dict[str, Any]]]) -> str:
    header = " ".join(name.rjust(width) for name, width in _COLUMNS)
    lines = [header, "-" * len(header)]
    for factor, r in rows:
        cpu = r["process_cpu_share"]
        share = r["retry_after_share"]
        values = (
            f"{factor:g}x", _n(r["offered_rps"]), _n(r["achieved_rps"]), _n(r["accepted_rps"]),
            _n(r["shed_rps"]), str(r["errors"]), str(r["gen_limited"]),
            _n(r["accepted_p50_ms"]), _n(r["accepted_p90_ms"]), _n(r["accepted_p99_ms"]),
            _n(r["accepted_max_ms"]), _n(r["refusal_p50_ms"]), _n(r["refusal_p99_ms"]),
            _n(None if share is None else 100 * share, 0), _n(100 * r["gen_cpu_share"], 0),
            *(_n(100 * cpu[k], 0) if k in cpu else "-" for k in ("gateway", "mock", "postgres")),
            str(r["peak_open_connections"]), str(r["new_connections"]),
            str(r["connects_over_1s"]),
        )
        lines.append(" ".join(v.rjust(w) for v, (_, w) in zip(values, _COLUMNS, strict=True)))
    return "\n".join(lines)


def verdict(base: dict[str, Any], over: dict[str, Any], factor: float) -> list[str]:
    """The verdict lines; the last one is PASS or FAIL for the target."""
    p99_1, p99_2 = base["accepted_p99_ms"], over["accepted_p99_ms"]
    ratio = p99_2 / p99_1 if p99_1 and p99_2 is not None else math.nan
    sent = over["sent"] or 1
    shed_share = over["shed"] / sent
    refusals = over["shed"]
    all_retry = refusals == 0 or over["retry_after_share"] == 1.0
    errors_ok = over["errors"] <= ERROR_LIMIT * sent
    gen_busy = max(base["gen_cpu_share"], over["gen_cpu_share"]) > GEN_CPU_LIMIT
    gen_limited = base["gen_limited"] + over["gen_limited"]
    lines = [
        f"p99 accepted at {factor:g}x / p99 at 1x = {_n(ratio, 2)} (target <= "
        f"{P99_RATIO_TARGET:g})   [{_n(p99_2)} ms / {_n(p99_1)} ms]",
        f"shed at {factor:g}x: {100 * shed_share:.1f}% of {over['sent']} requests sent"
        f" ({refusals} refusals: {over['refusal_kinds'] or 'none'});"
        f" at 1x: {base['shed']} of {base['sent']}",
        "every refusal carried retry-after: "
        + ("yes" if all_retry else f"NO ({_n(100 * (over['retry_after_share'] or 0), 1)}%)")
        + ("" if refusals else " (no refusals at all)"),
        f"errors at {factor:g}x: {over['errors']} ({over['timeouts']} timeouts; outside the"
        f" window {base['outside_window_timeouts']} at 1x, {over['outside_window_timeouts']}"
        f" at {factor:g}x)"
        + (f": {'; '.join(over['error_samples'])}" if over["errors"] else ""),
        f"generator CPU {100 * base['gen_cpu_share']:.0f}% / {100 * over['gen_cpu_share']:.0f}%"
        f" of a core: " + ("over 60%, the generator may be the limit" if gen_busy
                           else "under 60%, not the limit")
        + f"; {gen_limited} arrivals generator-limited"
        + (f" (all {_peak_conns(base, over)} connections were busy connecting or"
           " waiting for an answer: the server held them)" if gen_limited else ""),
    ]
    few = min(base["accepted"], over["accepted"])
    if few < 100:
        lines.append(f"note: only {few} accepted requests in a run: its p99 is about its max")
    base_bad = base["shed"] + base["errors"] + base["gen_limited"]
    # The baseline must be a run at capacity, not past it: held to the ladder's test.
    base_ok = sustained(base, math.inf)
    if not base_ok:
        lines.append(f"note: at 1x R the gateway did not keep up as a ladder rung must (it"
                     f" refused, failed or held {base_bad} of {base['scheduled']} arrivals,"
                     f" or left a backlog): the baseline p99 is not a healthy 'at capacity'"
                     " figure, so the ratio says nothing")
    if not refusals and over["accepted_rps"] >= 0.95 * over["offered_rps"]:
        lines.append(f"note: the gateway accepted nearly all of {factor:g}x R: R was not its"
                     " capacity (given too low, or closed-loop c=50 underestimates it)")
    limited_ok = gen_limited <= ERROR_LIMIT * (base["scheduled"] + over["scheduled"])
    passed = ratio <= P99_RATIO_TARGET and all_retry and errors_ok and limited_ok and base_ok
    lines.append(("PASS" if passed else "FAIL") + f": needs p99 ratio <= {P99_RATIO_TARGET:g}"
                 f" ({_n(ratio, 2)}), every refusal with retry-after ({all_retry}), errors"
                 f" <= {100 * ERROR_LIMIT:g}% of arrivals ({errors_ok}), generator-limited"
                 f" <= {100 * ERROR_LIMIT:g}% ({limited_ok}), 1x R kept up as a ladder rung"
                 f" must ({base_ok})")
    return lines


def _peak_conns(*runs: dict[str, Any]) -> int:
    return max(int(r["peak_open_connections"]) for r in runs)


def settle_capacity(candidates: list[float], run_1x: Callable[[float], dict[str, Any]],
                    ) -> tuple[float, dict[str, Any]]:
    """R and its 1x run: the first candidate (highest first) whose 1x run kept up, or
    the last one tried."""
    for capacity in candidates:
        print(f"capacity R = {capacity:,.1f} req/s", flush=True)
        base = run_1x(capacity)
        if sustained(base, math.inf):
            break
        if capacity != candidates[-1]:
            print("  1x R did not keep up, so R was not the capacity: again at the next"
                  " lower step that kept up on the ladder", flush=True)
    return capacity, base


def _run(target: Target, factor: float, capacity: float,
         args: argparse.Namespace) -> dict[str, Any]:
    result = run_open_loop(target, factor * capacity, args)
    print(f"  {factor:g}x R = {factor * capacity:,.1f}/s: accepted"
          f" {result['accepted_rps']:,.1f}/s, shed {result['shed_rps']:,.1f}/s,"
          f" errors {result['errors']}, p99 {_n(result['accepted_p99_ms'])} ms,"
          f" drained in {result['drain_s']:.1f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = reachable_tmp_dir("airgate-overload-")
    with ExitStack() as stack:
        mock = start_bench_mock(workdir, args.mock)
        stack.callback(mock.stop)
        gateway = start_gateway(workdir, mock.url,
                                settings=dict(args.set))
        stack.callback(shutil.rmtree, gateway.data_dir, True)
        stack.callback(gateway.stop)
        watch = gateway.watch(mock)
        print(f"mock {mock.url} (pid {mock.pid}), gateway {gateway.server.url}"
              f" (pid {gateway.server.pid}, postgres {gateway.postmaster_pid()});"
              f" scenario {args.scenario}"
              f" {SCENARIOS[args.scenario]['mock']}", flush=True)
        target = Target("gateway", "127.0.0.1", gateway.server.port, "/v1", gateway.api_key,
                        MODEL, watch, "gateway")
        candidates = ([args.capacity_rps] if args.capacity_rps
                      else measure_capacity(target, args))
        tried: list[float] = []

        def run_1x(rate: float) -> dict[str, Any]:
            tried.append(rate)
            return _run(target, 1.0, rate, args)

        capacity, base = settle_capacity(candidates, run_1x)
        rows = [(1.0, base), (args.factor, _run(target, args.factor, capacity, args))]
    print(f"\nopen loop, {args.arrival} arrivals, {args.duration_s:g} s measured after"
          f" {args.warmup_s:g} s warm-up; latency from each arrival's scheduled time to its last"
          " byte; ref = time to refusal; r-a% = refusals carrying retry-after; CPU as % of"
          " one core; conns = peak open, new = opened in the window, >1s = of those, connects"
          " that took a second or more (SYN dropped at a full listen backlog)\n")
    print(format_rows(rows))
    print()
    if len(tried) > 1:
        print(f"R: the 1x run was tried at {len(tried)} steps of the ladder"
              f" ({', '.join(f'{r:,.0f}' for r in tried)}/s); R is the first that kept up")
    print("\n".join(verdict(rows[0][1], rows[1][1], args.factor)))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"capacity_rps": capacity, "runs": [{"factor": f, **r} for f, r in rows]}, indent=2))
    if any(r["errors"] for _, r in rows):
        print(f"server logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
