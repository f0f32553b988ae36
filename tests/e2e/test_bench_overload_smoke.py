"""`python -m loadtest.bench.overload` runs end to end (capacity ladder, 1x and 2x) on a
real gateway, mock and Postgres. Tiny windows: this checks the command, not the figures."""

from __future__ import annotations

import subprocess
import sys


def test_overload_benchmark_runs_through_to_a_verdict() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench.overload", "--duration-s", "0.5",
         "--warmup-s", "0.2"],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "closed loop c=50:" in out
    assert "capacity R = " in out
    assert "p99 accepted at 2x / p99 at 1x = " in out
    assert any(line.startswith(("PASS: ", "FAIL: ")) for line in out.splitlines())
