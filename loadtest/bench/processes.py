"""Starting and stopping the benchmark's servers as subprocesses, and provisioning.

The mock upstream, the bare relay and the gateway each run in their own process so that
/proc tells their CPU and memory apart. The gateway is reached only over HTTP: it is
started with ``python -m proxy.cli serve`` and set up through its admin and account API.
Must not import ``proxy``, ``workers`` or ``store``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

MODEL = "gpt-4o-mini"
UPSTREAM_KEY = "mock-bench"
MAX_KEY_CONCURRENCY = 10_000  # the admin API's ceiling for one upstream key


def _gateway_setting(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not name.startswith("AIRGATE_") or not sep:
        raise argparse.ArgumentTypeError("takes AIRGATE_NAME=value")
    return name, value


def add_settings_option(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set AIRGATE_NAME=value`` (repeatable): extra gateway settings, as a list of
    (name, value) pairs in ``args.set``."""
    parser.add_argument("--set", action="append", default=[], type=_gateway_setting,
                        metavar="AIRGATE_X=V",
                        help=f"an extra gateway setting (repeatable), e.g. {example}")


class BenchSetupError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchSetupError(f"process exited ({proc.returncode}); see {log}:\n"
                                  + log.read_text(errors="replace")[-2000:])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise BenchSetupError(f"nothing listened on port {port} within {timeout_s} s; see {log}")


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, grace_s: float = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()


def start_server(name: str, argv: list[str], port: int, workdir: Path,
                 env: dict[str, str] | None = None, timeout_s: float = 30) -> Server:
    """``python argv`` (this interpreter), once it listens on ``port``."""
    return launch(name, [sys.executable, *argv], port, workdir, env, timeout_s)


def launch(name: str, command: list[str], port: int, workdir: Path,
           env: dict[str, str] | None = None, timeout_s: float = 30) -> Server:
    """``command``, its output in ``workdir/name.log``, once it listens on ``port``."""
    log = workdir / f"{name}.log"
    log_file = log.open("wb")
    proc = subprocess.Popen(
        command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=env,
    )
    server = Server(name, proc, port, log, log_file)
    try:
        wait_for_port(port, proc, timeout_s, log)
    except BaseException:
        server.stop(2)
        raise
    return server


def start_mock(workdir: Path, port: int | None = None,
               tls: tuple[Path, Path] | None = None) -> Server:
    """The Python mock; over https with ``tls`` (certificate and key files)."""
    port = port or free_port()
    argv = ["-m", "loadtest.mock_upstream", "--port", str(port)]
    if tls is not None:
        argv += ["--certfile", str(tls[0]), "--keyfile", str(tls[1])]
    return start_server("mock", argv, port, workdir)


def start_relay(workdir: Path, upstream: str) -> Server:
    port = free_port()
    return start_server("relay", ["-m", "loadtest.bench.relay", "--upstream", upstream,
                                  "--port", str(port), "--key", UPSTREAM_KEY], port, workdir)


@dataclass
class Gateway:
    server: Server
    data_dir: Path
    api_key: str = ""
    admin: dict[str, str] = field(default_factory=dict)
    workers: int = 1

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def watch(self, mock: Server) -> dict[str, int]:
        """The pids whose CPU a cell reports: the gateway (with ``--workers`` > 1 the
        supervisor and its worker processes; the embedded Postgres is not among its
        children, as ``pg_ctl`` detaches it), the mock, Postgres's tree."""
        name = "gateway+tree" if self.workers > 1 else "gateway"
        pids = {name: self.server.pid, "mock": mock.pid}
        postmaster = self.postmaster_pid()
        if postmaster is not None:
            pids["postgres+tree"] = postmaster
        return pids

    def stop(self) -> None:
        self.server.stop(40)
        pid = self.postmaster_pid()  # the gateway stops its cluster; make sure
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
                time.sleep(1)
            except ProcessLookupError:
                pass


def reachable_tmp_dir(prefix: str) -> Path:
    """A temp dir under /tmp that the ``postgres`` user can traverse (we may be root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def start_gateway(workdir: Path, mock_url: str, workers: int = 1, *,
                  max_concurrency: int = 2000,
                  settings: dict[str, str] | None = None) -> Gateway:
    """``python -m proxy.cli serve`` with its own embedded Postgres, provisioned over HTTP.

    With ``workers`` > 1 the CPU figures add up the supervisor and its workers; the RSS
    figure is still the supervisor's alone.
    ``max_concurrency`` is the mock upstream key's; ``settings`` are extra environment
    variables: ``AIRGATE_*`` settings (e.g. ``{"AIRGATE_MAX_WAITING_REQUESTS": "20000"}``),
    or ``SSL_CERT_FILE`` to trust an https mock's certificate."""
    port = free_port()
    data_dir = reachable_tmp_dir("airgate-bench-db-")
    admin = {"email": "bench-admin@airgate.local", "password": secrets.token_hex(12)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRGATE_")}
    env.update(AIRGATE_ADMIN_EMAIL=admin["email"], AIRGATE_ADMIN_PASSWORD=admin["password"],
               AIRGATE_SHUTDOWN_GRACE_S="5", AIRGATE_LOG_LEVEL="warning")
    env.update(settings or {})
    server = start_server(
        "gateway",
        ["-m", "proxy.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data_dir), "--workers", str(workers)],
        port, workdir, env=env, timeout_s=120,
    )
    gateway = Gateway(server, data_dir, admin=admin, workers=workers)
    try:
        gateway.api_key = provision(server.url, mock_url, admin, max_concurrency)
    except BaseException:
        gateway.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        raise
    return gateway


def _call(client: httpx.Client, path: str, body: dict[str, Any] | None = None,
          token: str | None = None) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    response = client.post(path, json=body if body is not None else {}, headers=headers)
    if response.status_code >= 300:
        raise BenchSetupError(f"POST {path}: {response.status_code} {response.text[:300]}")
    result: dict[str, Any] = response.json()
    return result


def provision(base: str, mock_url: str, admin: dict[str, str],
              max_concurrency: int = 2000) -> str:
    """Upstream key at the mock, a bench user with a huge token coupon; its sk- key.

    The admin API takes at most ``MAX_KEY_CONCURRENCY`` per key: above that, several keys
    (all at the mock) share ``max_concurrency``."""
    with httpx.Client(base_url=base, timeout=30) as client:
        admin_token = _call(client, "/api/admin/login", admin)["token"]
        for first in range(0, max_concurrency, MAX_KEY_CONCURRENCY):
            _call(client, "/api/admin/upstream-keys", {
                "name": f"bench mock {first // MAX_KEY_CONCURRENCY or ''}".strip(),
                "base_url": mock_url + "/v1", "api_key": UPSTREAM_KEY, "models": [MODEL],
                "max_concurrency": min(MAX_KEY_CONCURRENCY, max_concurrency - first),
            }, admin_token)
        user = {"email": f"bench-{secrets.token_hex(4)}@airgate.local",
                "password": secrets.token_hex(12)}
        token = _call(client, "/api/auth/register", user)["token"]
        code = f"BENCH{secrets.token_hex(6).upper()}"
        _call(client, "/api/admin/coupons",
              {"code": code, "kind": "tokens", "value": 10**12, "maxUses": 1}, admin_token)
        _call(client, "/api/coupon/redeem", {"code": code}, token)
        key: str = _call(client, "/api/auth/apikey", {"name": "bench"}, token)["api_key"]
        return key
