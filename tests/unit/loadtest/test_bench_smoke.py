"""One quick benchmark run (mock and bare relay, no gateway) finishes with a clean table."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest


@pytest.mark.parametrize("native", ["native", "python"])
def test_quick_benchmark_prints_rows_without_errors(native: str) -> None:
    """With the native mock and generator (where a C compiler is), and the Python ones."""
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--quick", "--targets", "direct,relay",
         "--scenarios", "nonstream", "--mock", native, "--gen", native],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()
            if line.split()[:1] == ["nonstream"] and len(line.split()) == 19]
    assert [(r[1], r[2]) for r in rows] == [
        ("1", "direct"), ("1", "relay"), ("10", "direct"), ("10", "relay")]
    for row in rows:
        assert float(row[3].replace(",", "")) > 0, row  # requests/s
        assert row[17] == "0", row  # errors
        assert row[18] == "0", row  # shed
    assert "some cells had errors" not in done.stdout
    built = native == "native" and shutil.which("cc") is not None
    lines = done.stdout.splitlines()
    assert f"load generator: {'native' if built else 'python'}" in lines
    mock_line = next(line for line in lines if line.startswith("mock upstream"))
    assert mock_line.endswith(", native-mock)" if built else ", mock)")


def test_rounds_alternate_targets_and_pool_into_one_row_each() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--targets", "direct,relay",
         "--scenarios", "stream", "--concurrency", "2", "--duration-s", "0.5",
         "--warmup-s", "0.2", "--rounds", "2"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    progress = [line.split()[2] + line.split()[3] for line in done.stdout.splitlines()
                if line.split()[:1] == ["stream"] and line.split()[3].startswith("[")]
    assert progress == ["direct[1/2]:", "relay[1/2]:", "direct[2/2]:", "relay[2/2]:"]
    rows = [line.split() for line in done.stdout.splitlines()
            if line.split()[:1] == ["stream"] and len(line.split()) == 19]
    assert [r[2] for r in rows] == ["direct", "relay"]
    for row in rows:
        assert float(row[3].replace(",", "")) > 0, row
        assert row[17] == "0", row
    assert "2 rounds per cell, samples pooled" in done.stdout
