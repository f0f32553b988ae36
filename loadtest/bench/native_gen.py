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
from typing import Any

from loadtest.bench.loadgen import Spec, figures, sample

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
    result = parse(rest)
    latencies, ttfbs = result.pop("latencies"), result.pop("ttfbs")
    return {**figures(spec, latencies, ttfbs, before, after), **result, "generator": "native"}
