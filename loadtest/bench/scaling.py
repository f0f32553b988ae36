"""``python -m loadtest.bench.scaling``: how much more ``airgate serve --workers N``
serves than one worker, on this machine, in one run.

The upstream is nginx answering every request with the bytes the mock upstream gives
for the scenario, and the load comes from wrk (``loadtest.bench.native``): the Python
mock and generator would take most of the second core themselves. For each scenario the
gateways (one per worker count, each with its own embedded Postgres, all pointed at the
same nginx) take turns for ``--rounds`` rounds; each turn waits until the servers are
idle, runs wrk for ``--warmup-s`` unmeasured, then for ``--duration-s``. It prints each
turn, the pooled figures and each count's ratio to one worker in completions (200s) per
second, with the CPU the gateway, nginx and wrk used, and PASS or FAIL against
``--target`` for the largest count. Must not import ``proxy``, ``workers`` or ``store``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtest.bench.cli import request_body, settle
from loadtest.bench.native import (
    WrkResult,
    require,
    run_wrk,
    start_nginx,
    wrk_script,
)
from loadtest.bench.processes import (
    MODEL,
    UPSTREAM_KEY,
    Gateway,
    add_settings_option,
    reachable_tmp_dir,
    start_gateway,
    start_mock,
)
from loadtest.bench.stats import CLOCK_TICKS, read_tree_cpu_ticks

CONTENT_TYPES = {"nonstream": "application/json", "stream": "text/event-stream"}
# Capacity, not shedding: wrk's connections come back the instant they are refused, and a
# saturated worker that sheds spends its core refusing them (one worker at c=50: 1,521
# completions and 2,361 refusals a second), which would inflate the ratio. --set
# AIRGATE_OVERLOAD_LAG_MS=5 measures with the default shedding.
DEFAULT_SETTINGS = {"AIRGATE_OVERLOAD_LAG_MS": "0"}


@dataclass
class Turn:
    wrk: WrkResult
    gateway_cores: float
    nginx_cores: float


@dataclass
class Pooled:
    """The turns of one worker count, added up."""

    workers: int
    turns: list[Turn] = field(default_factory=list)

    def _count(self, status: int) -> int:
        return sum(t.wrk.statuses.get(status, 0) for t in self.turns)

    @property
    def seconds(self) -> float:
        return sum(t.wrk.duration_s for t in self.turns)

    @property
    def completions_per_s(self) -> float:
        return self._count(200) / self.seconds if self.turns else 0.0

    @property
    def refused_per_s(self) -> float:
        return self._count(429) / self.seconds if self.turns else 0.0

    @property
    def other(self) -> int:
        """Answers neither 200 nor 429, and socket errors."""
        return sum(t.wrk.other for t in self.turns)

    def mean(self, figure: Callable[[Turn], float]) -> float:
        values = [figure(t) for t in self.turns]
        return sum(values) / len(values) if values else 0.0

    @property
    def wrk_cores(self) -> float:
        return sum(t.wrk.cpu_s for t in self.turns) / self.seconds if self.turns else 0.0


def ratios(pooled: list[Pooled]) -> dict[int, float]:
    """Each worker count's completions per second over one worker's (the first count)."""
    base = pooled[0].completions_per_s
    return {p.workers: (p.completions_per_s / base if base else 0.0) for p in pooled}


def verdict(pooled: list[Pooled], target: float) -> tuple[bool, str]:
    """PASS when the largest count reaches ``target`` times one worker with nothing but
    200s and 429s (no errors, no timeouts)."""
    largest = max(pooled, key=lambda p: p.workers)
    ratio = ratios(pooled)[largest.workers]
    errors = sum(p.other for p in pooled)
    passed = ratio >= target and errors == 0
    reason = (f"{largest.workers} workers: {ratio:.2f}x one worker (target {target:g}x)"
              + (f"; {errors} errors" if errors else ""))
    return passed, reason


def format_table(pooled: list[Pooled]) -> str:
    rows = [("workers", "completions/s", "x 1 worker", "refused/s", "errors", "p50 ms",
             "p99 ms", "gateway cores", "nginx cores", "wrk cores")]
    for p, ratio in zip(pooled, ratios(pooled).values(), strict=True):
        rows.append((str(p.workers), f"{p.completions_per_s:,.0f}", f"{ratio:.2f}",
                     f"{p.refused_per_s:,.1f}", str(p.other),
                     f"{p.mean(lambda t: t.wrk.p50_ms):.1f}",
                     f"{p.mean(lambda t: t.wrk.p99_ms):.1f}",
                     f"{p.mean(lambda t: t.gateway_cores):.2f}",
                     f"{p.mean(lambda t: t.nginx_cores):.2f}",
                     f"{p.wrk_cores:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
                     for row in rows)


def canned_answer(workdir: Path, body: bytes) -> bytes:
    """What the mock upstream answers to ``body``: nginx will answer it to everything."""
    mock = start_mock(workdir)
    try:
        response = httpx.post(f"{mock.url}/v1/chat/completions", content=body, timeout=30,
                              headers={"authorization": f"Bearer {UPSTREAM_KEY}",
                                       "content-type": "application/json"})
        response.raise_for_status()
        return response.content
    finally:
        mock.stop(5)


def run_turn(gateway: Gateway, nginx_pid: int, script: Path,
             args: argparse.Namespace) -> Turn:
    url = f"{gateway.server.url}/v1/chat/completions"
    if args.warmup_s > 0:
        run_wrk(url, script, connections=args.concurrency, duration_s=args.warmup_s)
    gw_pid = gateway.server.pid
    gw_before, ng_before = read_tree_cpu_ticks(gw_pid), read_tree_cpu_ticks(nginx_pid)
    result = run_wrk(url, script, connections=args.concurrency, duration_s=args.duration_s)
    gw_after, ng_after = read_tree_cpu_ticks(gw_pid), read_tree_cpu_ticks(nginx_pid)

    def cores(before: int | None, after: int | None) -> float:
        if before is None or after is None:
            return 0.0
        return (after - before) / CLOCK_TICKS / result.duration_s  # the whole seconds wrk ran

    return Turn(result, cores(gw_before, gw_after), cores(ng_before, ng_after))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench.scaling",
        description="Completions per second of `serve --workers N` against one worker, "
                    "with nginx as the upstream and wrk as the load.")
    parser.add_argument("--workers", default="1,2", help="comma-separated; the first is "
                        "the base of the ratios")
    parser.add_argument("--scenarios", default="nonstream,stream")
    parser.add_argument("--concurrency", type=int, default=50, help="wrk connections")
    parser.add_argument("--duration-s", type=float, default=8.0,
                        help="measured s per turn (wrk runs whole seconds: rounded)")
    parser.add_argument("--warmup-s", type=float, default=2.0,
                        help="unmeasured s per turn (0: none; else rounded, at least 1)")
    parser.add_argument("--rounds", type=int, default=3, help="turns per worker count")
    parser.add_argument("--target", type=float, default=1.7,
                        help="the ratio the largest count must reach")
    add_settings_option(parser, "AIRGATE_OVERLOAD_LAG_MS=5 (default here: 0, no shedding)")
    args = parser.parse_args(argv)
    args.settings = {**DEFAULT_SETTINGS, **dict(args.set)}
    args.worker_counts = [int(v) for v in args.workers.split(",") if v.strip()]
    args.scenario_names = [v.strip() for v in args.scenarios.split(",") if v.strip()]
    for name in args.scenario_names:
        if name not in CONTENT_TYPES:
            parser.error(f"--scenarios: {name!r} is not one of {', '.join(CONTENT_TYPES)}")
    if not args.worker_counts or min(args.worker_counts) < 1:
        parser.error("--workers: give counts of 1 or more")
    if len(set(args.worker_counts)) != len(args.worker_counts):
        parser.error("--workers: give each count once")
    return args


def run_scenario(scenario: str, workdir: Path, args: argparse.Namespace) -> bool:
    body = request_body(scenario, MODEL)
    answer = canned_answer(workdir, body)
    with ExitStack() as stack:
        nginx = start_nginx(workdir / f"nginx-{scenario}", answer, CONTENT_TYPES[scenario])
        stack.callback(nginx.stop)
        direct_script = workdir / f"{scenario}-direct.lua"
        direct_script.write_text(wrk_script(body, None))
        direct = run_wrk(f"{nginx.url}/v1/chat/completions", direct_script,
                         connections=args.concurrency, duration_s=min(args.duration_s, 3))
        print(f"{scenario}: wrk straight at nginx: {direct.rate(200):,.0f} req/s "
              f"(wrk {direct.cpu_s / direct.duration_s:.2f} cores): the ceiling of the "
              "load tools", flush=True)
        gateways: dict[int, Gateway] = {}
        scripts: dict[int, Path] = {}
        for count in args.worker_counts:
            gateway = start_gateway(workdir, nginx.url, count, settings=args.settings)
            stack.callback(gateway.stop)
            gateways[count] = gateway
            scripts[count] = workdir / f"{scenario}-{count}.lua"
            scripts[count].write_text(wrk_script(body, gateway.api_key))
        pooled = [Pooled(count) for count in args.worker_counts]
        servers = [nginx.pid, *(g.server.pid for g in gateways.values())]
        for number in range(1, args.rounds + 1):
            for p in pooled:
                settle(servers, read_tree_cpu_ticks)
                turn = run_turn(gateways[p.workers], nginx.pid, scripts[p.workers], args)
                p.turns.append(turn)
                print(f"  {scenario} workers={p.workers} [{number}/{args.rounds}]: "
                      f"{turn.wrk.rate(200):,.0f} completions/s, {turn.wrk.rate(429):,.1f}"
                      f" refused/s, {turn.wrk.other} errors, gateway "
                      f"{turn.gateway_cores:.2f} cores", flush=True)
    print(f"\n{scenario}, c={args.concurrency}, {args.rounds} x {args.duration_s:g} s "
          "per count, pooled:")
    print(format_table(pooled))
    passed, reason = verdict(pooled, args.target)
    print(f"{scenario}: {'PASS' if passed else 'FAIL'}: {reason}\n", flush=True)
    return passed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require("nginx", "wrk")
    print(f"gateway settings: {args.settings}", flush=True)
    workdir = reachable_tmp_dir("airgate-scaling-")
    keep = False
    try:
        results = [run_scenario(s, workdir, args) for s in args.scenario_names]
    except BaseException:
        keep = True
        print(f"(logs kept in {workdir})", file=sys.stderr)
        raise
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
