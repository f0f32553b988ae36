"""``loadtest.bench.scaling`` end to end, briefly: nginx answers, wrk drives one and two
gateway workers, and the table and verdict come out. Needs wrk and nginx on PATH
(``scripts/bench-tools``; CI installs them); skipped without them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.bench.native import require, run_wrk, start_nginx, wrk_script
from loadtest.bench.processes import BenchSetupError


def _installed() -> bool:
    try:
        require("wrk", "nginx")
    except BenchSetupError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _installed(),
                                reason="wrk and nginx are not installed (scripts/bench-tools)")


def test_nginx_answers_every_post_with_the_file_and_wrk_counts_it(tmp_path: Path) -> None:
    nginx = start_nginx(tmp_path / "nginx", b"data: [DONE]\n\n", "text/event-stream")
    try:
        script = tmp_path / "post.lua"
        script.write_text(wrk_script(b'{"model": "m"}', None))
        result = run_wrk(nginx.url + "/v1/chat/completions", script, connections=4,
                         duration_s=1)
    finally:
        nginx.stop()
    assert set(result.statuses) == {200}
    assert result.statuses[200] > 100
    assert result.other == 0
    assert 0 < result.p50_ms <= result.p99_ms


def test_a_short_scaling_run_prints_both_counts_and_a_verdict() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench.scaling", "--scenarios", "stream",
         "--rounds", "1", "--duration-s", "1", "--warmup-s", "0", "--concurrency", "8",
         "--target", "0.1"],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines()
            if line.split()[:1] in (["1"], ["2"]) and len(line.split()) == 10]
    assert [r[0] for r in rows] == ["1", "2"]
    for row in rows:
        assert float(row[1].replace(",", "")) > 0  # completions/s
        assert row[4] == "0"  # errors
    assert "stream: PASS: 2 workers:" in done.stdout
