"""``python -m loadtest.locust_demo``: locust against a throw-away ``airgate demo``, one command.

Starts ``airgate demo`` (gateway + mock upstream + demo user) on a free port with its own
embedded Postgres in a temp dir, reads the ``sk-`` key it prints, runs locust headless
with ``loadtest/locustfile.py`` (its summary and the money check print here), stops the
demo and exits with locust's exit code (nonzero on failures or a money mismatch).
Arguments after ``--`` go to locust unchanged. Must not import ``proxy``, ``workers`` or
``store``: the demo is a subprocess reached over HTTP.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from loadtest.bench.processes import free_port, reachable_tmp_dir

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
_KEY_LINE = re.compile(r"API key:\s+(sk-\S+)")


def _read_key(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """Wait for the demo's ``API key:`` line; keep draining its stdout afterwards."""
    found: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = _KEY_LINE.search(line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(timeout_s)
    if not found:
        raise SystemExit(f"airgate demo printed no API key within {timeout_s:.0f} s")
    return found[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.locust_demo", description=__doc__)
    parser.add_argument("classes", nargs="*", help="user classes, e.g. ChatUser (default all)")
    parser.add_argument("--tags", nargs="*", help="locust tags: stream chat embeddings "
                        "account quota")
    parser.add_argument("-u", "--users", type=int, default=50)
    parser.add_argument("-r", "--spawn-rate", type=float, default=10)
    parser.add_argument("-t", "--run-time", default="20s")
    args, extra = parser.parse_known_args(argv)
    port = free_port()
    data_dir = reachable_tmp_dir("airgate-locust-")
    admin_email, admin_password = "locust-admin@airgate.local", secrets.token_hex(12)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRGATE_")}
    env.update(AIRGATE_ADMIN_EMAIL=admin_email, AIRGATE_ADMIN_PASSWORD=admin_password,
               AIRGATE_LOG_LEVEL="warning", AIRGATE_SHUTDOWN_GRACE_S="5")
    log = (data_dir / "demo.log").open("w")
    demo = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "demo", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir / "data")],
        stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, env=env,
    )
    code = 1
    try:
        key = _read_key(demo, 120)
        url = f"http://127.0.0.1:{port}"
        print(f"airgate demo on {url} (log {data_dir / 'demo.log'}); running locust", flush=True)
        locust_env = dict(env, AIRGATE_URL=url, AIRGATE_KEY=key)
        command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
                   "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time,
                   "--host", url, "--stop-timeout", "10", "--only-summary"]
        if args.tags:
            command += ["--tags", *args.tags]
        command += [*extra, *args.classes]
        code = subprocess.run(command, env=locust_env, check=False).returncode
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait(5)
        log.close()
        time.sleep(0.5)
        if code == 0:
            shutil.rmtree(data_dir, ignore_errors=True)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
