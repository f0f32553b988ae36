"""The native load generator's driver: runs ``native_gen.c`` for one cell and returns the
same figures as :func:`loadtest.bench.loadgen.run_load`.

The Python generator costs ~0.7 CPU-ms per realistic request (a third of a core at 400
requests/s), on the same two cores as the gateway it measures, and its bursts come at
the moments the gateway's do. The C generator does the same closed loop for a few
percent of a core. It prints when its measured window opens and closes, and this driver
samples the watched servers' CPU at those lines, as ``run_load`` does at its edges.

Built like the native mock (:func:`loadtest.bench.native_mock.compile_c`); the bench
falls back to the Python generator when there is no C compiler.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.bench.stats import CLOCK_TICKS, percentile, read_peak_rss_kib

if TYPE_CHECKING:
    from loadtest.bench.loadgen import Spec

SOURCE = Path(__file__).with_name("native_gen.c")


def command(binary: str, spec: Spec, request_file: str) -> list[str]:
    return [binary, spec.host, str(spec.port), str(spec.concurrency), str(spec.warmup_s),
            str(spec.duration_s), str(spec.timeout_s), str(spec.ramp_s),
            "1" if spec.honour_retry_after else "0", request_file]


def parse(lines: list[str]) -> dict[str, Any]:
    """The generator's output after its window closed, as figures."""
    ttfbs: list[float] = []
    latencies: list[float] = []
    samples: list[str] = []
    summary: list[str] = []
    for line in lines:
        kind, _, rest = line.partition(" ")
        if kind == "R":
            ttfb_us, latency_us = rest.split()
            ttfbs.append(int(ttfb_us) / 1e6)
            latencies.append(int(latency_us) / 1e6)
        elif kind == "E":
            count, _, what = rest.partition(" ")
            samples.append(f"{count}x {what}")
        elif kind == "S":
            summary = rest.split()
    if len(summary) != 7:
        raise RuntimeError("native generator: no summary line")
    errors, shed, cpu_s, window_s, unfinished, oldest_s, older = summary
    return {
        "latencies": latencies, "ttfbs": ttfbs, "errors": int(errors), "shed": int(shed),
        "error_samples": samples, "gen_cpu_s": float(cpu_s), "window_s": float(window_s),
        "unfinished": int(unfinished), "oldest_unfinished_s": float(oldest_s),
        "unfinished_older_than_window": int(older),
    }


def run_native(binary: str, spec: Spec) -> dict[str, Any]:
    from loadtest.bench.loadgen import sample

    with tempfile.NamedTemporaryFile(prefix="airgate-request-") as request:
        request.write(spec.request)
        request.flush()
        with subprocess.Popen(command(binary, spec, request.name), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            assert proc.stderr is not None
            before: dict[str, int | None] = {}
            after: dict[str, int | None] = {}
            for line in proc.stdout:
                if line == "window start\n":
                    before = sample(spec.watch)
                elif line == "window end\n":
                    after = sample(spec.watch)
                    break
            rest = proc.stdout.read().splitlines()
            stderr = proc.stderr.read()
            if proc.wait() != 0:
                raise RuntimeError(f"native generator failed: {stderr.strip()}")
    figures = parse(rest)
    process_cpu_s = {}
    for name, start in before.items():
        end = after.get(name)
        if start is not None and end is not None:
            process_cpu_s[name.removesuffix("+tree")] = (end - start) / CLOCK_TICKS
    latencies, ttfbs = figures.pop("latencies"), figures.pop("ttfbs")
    rss = read_peak_rss_kib(spec.rss_pid) if spec.rss_pid else None
    samples = {
        "latencies_ms": [round(1000 * v, 3) for v in latencies],
        "ttfbs_ms": [round(1000 * v, 3) for v in ttfbs],
    } if spec.keep_samples else {}
    return {
        **samples,
        **figures,
        "completed": len(latencies),
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "ttfb_p50_ms": 1000 * percentile(ttfbs, 50),
        "ttfb_p99_ms": 1000 * percentile(ttfbs, 99),
        "process_cpu_s": process_cpu_s,
        "peak_rss_mib": rss / 1024 if rss is not None else None,
        "generator": "native",
    }
