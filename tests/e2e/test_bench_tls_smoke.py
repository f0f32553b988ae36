"""``python -m loadtest.bench --mock-tls`` end to end, small: the gateway relays from the
Python mock over https (trusting its self-signed certificate through ``SSL_CERT_FILE``)
without an error, and the option refuses targets the plain-HTTP generator would send to
the https mock."""

from __future__ import annotations

import subprocess
import sys


def test_the_gateway_is_measured_against_an_https_mock() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--mock-tls", "--targets", "gateway",
         "--scenarios", "stream", "--quick"],
        capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert any(line.startswith("mock upstream  https://localhost:")
               for line in done.stdout.splitlines())
    rows = [line.split() for line in done.stdout.splitlines()
            if line.split()[:1] == ["stream"] and len(line.split()) == 19]
    assert [(r[1], r[2]) for r in rows] == [("1", "gateway"), ("10", "gateway")]
    for row in rows:
        assert float(row[3].replace(",", "")) > 0, row  # requests/s
        assert row[17] == "0", row  # errors


def test_the_direct_target_is_refused_with_an_https_mock() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "--mock-tls", "--targets", "direct,gateway",
         "--quick"],
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "--mock-tls measures the gateway alone" in done.stderr
