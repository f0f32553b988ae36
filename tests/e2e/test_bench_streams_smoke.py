"""``python -m loadtest.bench.streams`` end to end, small: streams over HTTP/1.1 (one
connection each) and over h2c (many per connection; each stream outlasts the ramp, so
all 60 are open at once) all complete, and the summary says how many connections
carried them."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize(("extra", "connections"), [
    pytest.param([], 60, id="http1"),
    pytest.param(["--http2", "--streams-per-connection", "20"], 3, id="http2"),
])
def test_a_small_run_completes_every_stream(extra: list[str], connections: int) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench.streams", "--streams", "60", "--chunks", "3",
         "--chunk-delay-ms", "1000", "--ramp-s", "1", *extra],
        capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RESULT: PASS (60 streams, 0 dropped" in done.stdout
    assert re.search(r"completed OK\s+60\b", done.stdout)
    found = re.search(r"client connections\s+(\d+)", done.stdout)
    assert found is not None
    assert int(found.group(1)) == connections
