"""``airgate serve --workers N``: N gateway processes on one listening socket.

The supervisor prepares what the workers share: the embedded Postgres cluster (when no
``database_url`` is set), the migrations, and the listening sockets. Each worker inherits
one of its own (hypercorn's ``fd://`` bind), all bound to the same port with
``SO_REUSEPORT``: the kernel spreads new connections among them by a hash of their
addresses. With one socket shared, whichever worker was in ``accept`` when a burst of
connects arrived took them all (it accepts up to 64 at once, ``proxy.batch_accept``):
``wrk -c50`` against two workers ran on one of them, one run in two. The supervisor
keeps the sockets open, so connections that arrive for a worker being restarted wait in
its backlog (and wait longer if it keeps failing to start: the price of the even spread).
A port another process already listens on is refused, as a plain bind would be, rather
than shared. Without ``SO_REUSEPORT`` the workers share one socket.

Workers are ``airgate serve`` processes told their slot; each owns its share of every
upstream key's rpm/tpm/concurrency (they add up to the key's limits), and quota leases
plus change events keep users' quotas and admin changes consistent across them.
SIGTERM/SIGINT are passed on; a worker that dies is started again.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import trio

from proxy.settings import Settings
from store.cluster import EmbeddedCluster
from store.migrate import apply_migrations
from store.runtime import open_store

log = logging.getLogger("airgate.supervisor")

_RESTART_PAUSE_S = 1.0


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def listen_socket(host: str, port: int, backlog: int, *,
                  reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket the worker processes can inherit (``reuse_port``: one of a
    ``SO_REUSEPORT`` group on the port)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_sockets(host: str, port: int, backlog: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one port, each for one worker (``SO_REUSEPORT``);
    one socket shared by all where the system lacks it or ``count`` is 1."""
    if count == 1 or not hasattr(socket, "SO_REUSEPORT"):
        return [listen_socket(host, port, backlog)] * count
    # SO_REUSEPORT would let these join another instance's group on the port, and the
    # kernel would split the connections between the two; a plain bind fails there.
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(listen_socket(host, port, backlog, reuse_port=True))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def _migrate(dsn: str) -> None:
    async with open_store(dsn, pool_size=1) as db:
        await apply_migrations(db)


def _spawn(index: int, count: int, fd: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "proxy.cli", "serve", "--worker-slot",
               f"{index}/{count}/{fd}"]
    return subprocess.Popen(command, env=env, pass_fds=(fd,))


def run_workers(settings: Settings) -> int:
    """Run ``settings.workers`` worker processes until SIGTERM/SIGINT; return an exit code."""
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with ExitStack() as stack:
        dsn = settings.database_url
        if not dsn:
            cluster = EmbeddedCluster(Path(settings.data_dir) / "pgdata")
            dsn = cluster.start()
            stack.callback(cluster.stop_unless_in_use)
        trio.run(_migrate, dsn)
        count = settings.workers
        sockets = listen_sockets(settings.host, settings.port, settings.listen_backlog, count)
        for sock in set(sockets):
            stack.enter_context(sock)
        env = {**os.environ, "AIRGATE_DATABASE_URL": dsn, "AIRGATE_WORKERS": "1"}
        procs = [_spawn(i, count, sockets[i].fileno(), env) for i in range(count)]
        log.info("supervising %d workers on %s:%d", count, settings.host, settings.port)
        while not stopping:
            time.sleep(0.2)
            for i, proc in enumerate(procs):
                if proc.poll() is not None and not stopping:
                    log.error("worker %d exited with %s; starting it again", i, proc.returncode)
                    time.sleep(_RESTART_PAUSE_S)
                    procs[i] = _spawn(i, count, sockets[i].fileno(), env)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_grace_s + 15
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return 0 if all(p.returncode == 0 for p in procs) else 1
