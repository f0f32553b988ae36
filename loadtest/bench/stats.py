"""Pure helpers of the benchmark: percentiles, /proc parsing, the results table.

No I/O except the two thin ``read_*`` shells over /proc; everything else takes values
and returns values, so it is unit-tested directly. Must not import ``proxy``,
``workers`` or ``store``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
DIRECT: Final = "direct"
RELAY: Final = "relay"
# Generator CPU above this share of one core means the generator may be the limit.
GEN_BUSY_SHARE: Final = 0.85


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``; NaN if empty."""
    if not 0 < q <= 100:
        raise ValueError("q must be in (0, 100]")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


def proc_stat_ticks(stat: str, *, children: bool = False) -> int:
    """utime + stime (plus cutime + cstime of reaped children) from a /proc/<pid>/stat line.

    The command name (field 2) may hold spaces and parentheses, so split after the last ')'.
    """
    rest = stat[stat.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime, stime, cutime, cstime are fields 14..17.
    utime, stime, cutime, cstime = (int(v) for v in rest[11:15])
    return utime + stime + (cutime + cstime if children else 0)


def proc_stat_ppid(stat: str) -> int:
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def proc_status_kib(status: str, name: str) -> int | None:
    """A ``kB`` field such as ``VmHWM`` or ``VmRSS`` from /proc/<pid>/status."""
    for line in status.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return None


def read_cpu_ticks(pid: int, *, children: bool = False) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return proc_stat_ticks(f.read(), children=children)
    except (OSError, ValueError):
        return None


def read_peak_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return proc_status_kib(f.read(), "VmHWM")
    except OSError:
        return None


def read_tree_cpu_ticks(root: int) -> int | None:
    """CPU of ``root``, its reaped children and its live direct children (for postgres)."""
    total = read_cpu_ticks(root, children=True)
    if total is None:
        return None
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                stat = f.read()
        except OSError:
            continue
        if proc_stat_ppid(stat) == root:
            total += proc_stat_ticks(stat, children=True)
    return total


@dataclass
class Cell:
    """One measured (scenario, concurrency, target) combination."""

    scenario: str
    concurrency: int
    target: str
    rps: float
    completed: int
    errors: int
    window_s: float
    p50_ms: float
    p99_ms: float
    ttfb_p50_ms: float
    ttfb_p99_ms: float
    gen_cpu_s: float
    # CPU-ms per request of the process that serves the target (mock, relay, gateway).
    cpu_ms_per_req: float | None = None
    peak_rss_mib: float | None = None
    # CPU seconds in the window per watched process name ("mock", "gateway", "postgres").
    process_cpu_s: dict[str, float] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    shed: int = 0  # refusals with retry-after, waited out by the generator
    # Requests still unanswered when the window closed (not in the percentiles).
    unfinished: int = 0
    unfinished_older_than_window: int = 0
    oldest_unfinished_s: float = 0.0
    rounds: int = 1  # measured windows pooled into this cell (``pool_rounds``)
    # The raw samples (ms) behind the percentiles, kept only to pool rounds.
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    ttfbs_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def gen_cpu_share(self) -> float:
        return self.gen_cpu_s / self.window_s if self.window_s > 0 else 0.0

    @property
    def gen_us_per_req(self) -> float:
        return 1e6 * self.gen_cpu_s / self.completed if self.completed else math.nan

    def as_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        del out["latencies_ms"], out["ttfbs_ms"]
        out["gen_cpu_share"] = self.gen_cpu_share
        out["gen_us_per_req"] = self.gen_us_per_req
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def pool_rounds(rounds: Sequence[Cell]) -> Cell:
    """One cell from several measured windows of the same (scenario, concurrency, target):
    counts and CPU add up, requests/s is over the summed windows, and the percentiles are
    taken over every round's samples together (not averaged), so a p99 rests on all of
    them. Rounds of different targets run alternately, so slow drift on a shared machine
    falls on each target alike."""
    if not rounds:
        raise ValueError("no rounds to pool")
    first = rounds[0]
    if any((c.scenario, c.concurrency, c.target) != (first.scenario, first.concurrency,
                                                        first.target) for c in rounds):
        raise ValueError("rounds of different cells")
    if len(rounds) == 1:
        return first
    latencies = [v for c in rounds for v in c.latencies_ms]
    ttfbs = [v for c in rounds for v in c.ttfbs_ms]
    window = sum(c.window_s for c in rounds)
    completed = sum(c.completed for c in rounds)
    process_cpu: dict[str, float] = {}
    for c in rounds:
        for name, seconds in c.process_cpu_s.items():
            process_cpu[name] = process_cpu.get(name, 0.0) + seconds
    rss = [c.peak_rss_mib for c in rounds if c.peak_rss_mib is not None]
    per_req = [c.cpu_ms_per_req * c.completed for c in rounds if c.cpu_ms_per_req is not None]
    samples: dict[str, None] = {}
    for c in rounds:
        samples.update(dict.fromkeys(c.error_samples))
    return Cell(
        scenario=first.scenario, concurrency=first.concurrency, target=first.target,
        rps=completed / window if window > 0 else math.nan, completed=completed,
        errors=sum(c.errors for c in rounds), window_s=window,
        p50_ms=percentile(latencies, 50), p99_ms=percentile(latencies, 99),
        ttfb_p50_ms=percentile(ttfbs, 50), ttfb_p99_ms=percentile(ttfbs, 99),
        gen_cpu_s=sum(c.gen_cpu_s for c in rounds),
        cpu_ms_per_req=sum(per_req) / completed if per_req and completed else None,
        peak_rss_mib=max(rss) if rss else None, process_cpu_s=process_cpu,
        error_samples=list(samples), shed=sum(c.shed for c in rounds),
        unfinished=sum(c.unfinished for c in rounds),
        unfinished_older_than_window=sum(c.unfinished_older_than_window for c in rounds),
        oldest_unfinished_s=max(c.oldest_unfinished_s for c in rounds),
        rounds=sum(c.rounds for c in rounds), latencies_ms=latencies, ttfbs_ms=ttfbs,
    )


def busiest_share(before: dict[int, int | None], after: dict[int, int | None],
                  window_s: float) -> float:
    """The highest CPU share of one core, over ``window_s``, of the processes sampled
    twice (clock ticks by pid); processes missing from either sample are skipped."""
    shares = [0.0]
    for pid, start in before.items():
        end = after.get(pid)
        if start is not None and end is not None:
            shares.append((end - start) / CLOCK_TICKS / window_s)
    return max(shares)


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _delta(value: float, base: float | None) -> str:
    if base is None or math.isnan(base) or math.isnan(value):
        return "-"
    return f"{value - base:+.1f}"


def _ratio(value: float, base: float | None) -> str:
    if base is None or base <= 0 or math.isnan(value):
        return "-"
    return f"{value / base:.2f}"


_COLUMNS: Final = (
    ("scenario", 9), ("conc", 5), ("target", 8), ("req/s", 9), ("/direct", 7),
    ("/relay", 6), ("p50ms", 7), ("p99ms", 7), ("+p50", 6), ("+p99", 6),
    ("ttfb50", 7), ("ttfb99", 7), ("+ttfb50", 7), ("+ttfb99", 7), ("cpu-ms/req", 10),
    ("rssMiB", 6), ("gen%", 5), ("err", 5), ("shed", 5),
)


def format_table(cells: Sequence[Cell]) -> str:
    """Rows per cell; ratios and added latencies are against the same cell's direct run.

    ``+p50`` etc. are milliseconds added over the direct (mock-only) target; ``/relay`` is
    the requests/s ratio to the bare relay. ``gen%`` is the generator's CPU as a share of
    one core, marked ``!`` when it is high enough that the generator may be the limit.
    """
    by_key = {(c.scenario, c.concurrency, c.target): c for c in cells}
    header = " ".join(name.rjust(width) for name, width in _COLUMNS)
    lines = [header, "-" * len(header)]
    for c in cells:
        direct = by_key.get((c.scenario, c.concurrency, DIRECT))
        relay = by_key.get((c.scenario, c.concurrency, RELAY))
        gen = f"{100 * c.gen_cpu_share:.0f}" + ("!" if c.gen_cpu_share > GEN_BUSY_SHARE else "")
        values = (
            c.scenario, str(c.concurrency), c.target, _num(c.rps),
            _ratio(c.rps, direct.rps if direct else None),
            _ratio(c.rps, relay.rps if relay else None),
            _num(c.p50_ms), _num(c.p99_ms),
            _delta(c.p50_ms, direct.p50_ms if direct else None),
            _delta(c.p99_ms, direct.p99_ms if direct else None),
            _num(c.ttfb_p50_ms), _num(c.ttfb_p99_ms),
            _delta(c.ttfb_p50_ms, direct.ttfb_p50_ms if direct else None),
            _delta(c.ttfb_p99_ms, direct.ttfb_p99_ms if direct else None),
            _num(c.cpu_ms_per_req, 2), _num(c.peak_rss_mib, 0), gen, str(c.errors), str(c.shed),
        )
        lines.append(
            " ".join(v.rjust(width) for v, (_, width) in zip(values, _COLUMNS, strict=True))
        )
    return "\n".join(lines)


def format_versus(cells: Sequence[Cell], target: str, base: str) -> str:
    """One line per (scenario, concurrency): ``target`` against ``base`` (e.g. gateway/relay)."""
    by_key = {(c.scenario, c.concurrency, c.target): c for c in cells}
    lines = [
        f"{target} vs {base}: rps ratio, added p50/p99 ms, added ttfb p50 ms, cpu-ms/req ratio"
    ]
    seen: set[tuple[str, int]] = set()
    for c in cells:
        key = (c.scenario, c.concurrency)
        if key in seen:
            continue
        seen.add(key)
        mine, other = by_key.get((*key, target)), by_key.get((*key, base))
        if mine is None or other is None:
            continue
        cpu = (
            _ratio(mine.cpu_ms_per_req, other.cpu_ms_per_req)
            if mine.cpu_ms_per_req is not None
            else "-"
        )
        lines.append(
            f"  {c.scenario:>9} c={c.concurrency:<5} rps x{_ratio(mine.rps, other.rps):>5}"
            f"  p50 {_delta(mine.p50_ms, other.p50_ms):>7}"
            f"  p99 {_delta(mine.p99_ms, other.p99_ms):>7}"
            f"  ttfb50 {_delta(mine.ttfb_p50_ms, other.ttfb_p50_ms):>7}  cpu x{cpu}"
        )
    return "\n".join(lines)
