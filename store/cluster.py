"""An embedded PostgreSQL cluster: initdb, start, stop, create databases.

This module owns the life cycle of a local, loopback-only PostgreSQL cluster in a data
directory of our choosing (tests, single-box deployments). It is synchronous and drives the
server binaries through `subprocess`; it must not import asyncpg, trio or trio_asyncio, nor
pgserver's Python API (which chmods every parent directory up to ``/`` when run as root) —
only pgserver's bundled binaries are used.

Layout for a data dir ``D``: the postgres log is ``D.log`` and the unix socket directory
``D.sock`` next to it (or a short ``/tmp/airgate-pg-*`` path when that would exceed the
unix socket path limit). Our settings live in ``D/airgate.conf``, included from
``postgresql.conf`` and rewritten on every start, so the port and the `fast` flag may
change between restarts of the same cluster.

initdb and pg_ctl refuse to run as root. When we are root they run through
``runuser -u USER --`` as the system user :mod:`store.pg_install` picks, on binaries it
makes reachable for that user (finding the binaries lives there too).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import re
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from store.pg_install import (
    SHARED_INSTALL_DIR,
    ClusterError,
    as_user,
    ensure_os_user,
    find_pg_bin,
    pg_version,
    reachable_install,
    run_command,
)

__all__ = ["SHARED_INSTALL_DIR", "ClusterError", "EmbeddedCluster", "find_pg_bin",
           "pg_version"]

SUPERUSER = "airgate"
DEFAULT_DATABASE = "airgate"

_RUNTIME_CONF = "airgate.conf"
# sun_path is 108 bytes including the NUL; postgres appends "/.s.PGSQL.NNNNN.lock".
_SOCKET_PATH_MAX = 107 - len("/.s.PGSQL.65535.lock")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_START_TIMEOUT_S = 60
_LOG_TAIL_LINES = 40


class EmbeddedCluster:
    """A loopback-only PostgreSQL cluster in `data_dir`, reused across restarts.

    `start()` initialises the data directory if needed, starts the server (or adopts one
    already running on it) and returns the DSN of the ``airgate`` database. `fast` is for
    test clusters only: it skips fsync at initdb and turns off fsync, synchronous_commit
    and full_page_writes, so a crash can corrupt the cluster.
    """

    def __init__(self, data_dir: Path, *, port: int | None = None, fast: bool = False) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.log_file = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.socket_dir = _socket_dir_for(self.data_dir)
        self._requested_port = port
        self._fast = fast
        self._port: int | None = None
        self._bin: Path | None = None
        self._os_user: str | None = None

    # -- public API ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise ClusterError("cluster is not started")
        return self._port

    @property
    def dsn(self) -> str:
        """DSN of the ``airgate`` database (after `start`)."""
        return self.dsn_for(DEFAULT_DATABASE)

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> str:
        """Initialise if needed, start (or adopt the running server), return the DSN."""
        self._resolve_runtime()
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._check_major_version()
        running = self._running_postmaster()
        if running is not None:
            if self._requested_port not in (None, running):
                raise ClusterError(
                    f"cluster in {self.data_dir} is already running on port {running}, "
                    f"not on the requested port {self._requested_port}"
                )
            self._port = running
        else:
            self._start_server()
        self._ensure_database(DEFAULT_DATABASE)
        return self.dsn

    def stop(self) -> None:
        """Stop the server with ``pg_ctl stop -m fast``; a no-op if it is not running."""
        if self._running_postmaster() is None:
            return
        self._resolve_runtime()
        result = self._pg(
            ["pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", str(_START_TIMEOUT_S),
             "stop"],
            check=False,
        )
        if result.returncode != 0 and self._running_postmaster() is not None:
            raise ClusterError(f"pg_ctl stop failed: {result.stderr.strip()}{self._log_tail()}")

    def stop_unless_in_use(self) -> bool:
        """Stop the server unless another process is still connected to it; return
        whether it was stopped. For a gateway leaving: a second gateway started on the
        same data directory (by mistake, or one that failed to start) must not take the
        database away from the first. Call after closing this process's own pool."""
        if self._running_postmaster() is None:
            return True
        try:
            others = int(self.psql(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"))
        except (ClusterError, ValueError):
            others = 0  # cannot tell: a server that cannot answer is stopped as before
        if others:
            return False
        self.stop()
        return True

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create database `name` (optionally from `template`) and return its DSN."""
        sql = f"CREATE DATABASE {_quote_ident(name)}"
        if template is not None:
            sql += f" TEMPLATE {_quote_ident(template)}"
        self.psql(sql)
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name` if it exists, disconnecting its sessions."""
        self.psql(f"DROP DATABASE IF EXISTS {_quote_ident(name)} WITH (FORCE)")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run `sql` with psql as the superuser and return its unaligned output."""
        if self._bin is None:
            raise ClusterError("cluster is not started")
        cmd = [str(self._bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
               "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, "-d", database,
               "-c", sql]
        env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
        result = run_command(cmd, timeout=60, check=False, env=env)
        if result.returncode != 0:
            raise ClusterError(f"psql failed ({sql!r}): {result.stderr.strip()}")
        return result.stdout.strip()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- setup ----------------------------------------------------------------------------

    def _resolve_runtime(self) -> None:
        if self._bin is not None:
            return
        bin_dir = find_pg_bin()
        if os.geteuid() == 0:
            self._os_user = self._existing_owner() or ensure_os_user()
            bin_dir = reachable_install(bin_dir, self._os_user)
        self._bin = bin_dir

    def _existing_owner(self) -> str | None:
        """The non-root owner of an already initialised data dir: it must keep running it."""
        if not (self.data_dir / "PG_VERSION").exists():
            return None
        uid = self.data_dir.stat().st_uid
        if uid == 0:
            return None
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return None

    def _prepare_dirs(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self.log_file.touch(exist_ok=True)
        if self._os_user is None:
            return
        user = pwd.getpwnam(self._os_user)
        stat = self.socket_dir.stat()
        if stat.st_uid not in (0, user.pw_uid) or stat.st_mode & 0o002:
            raise ClusterError(f"socket dir {self.socket_dir} is owned by someone else")
        for path in (self.data_dir, self.socket_dir, self.log_file):
            os.chown(path, user.pw_uid, user.pw_gid)
        probe = as_user(self._os_user, ["test", "-x", str(self.data_dir), "-a",
                                         "-w", str(self.data_dir), "-a", "-w", str(self.log_file)])
        if run_command(probe, timeout=30, check=False).returncode != 0:
            raise ClusterError(
                f"postgres runs as the unprivileged user {self._os_user!r}, which cannot reach "
                f"{self.data_dir} (a parent directory is probably private, like /root). "
                "Choose a data dir that user can traverse, e.g. under /var/lib or /tmp."
            )

    def _initdb(self) -> None:
        cmd = ["initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust",
               "--encoding=UTF8", "--no-locale"]
        if self._fast:
            cmd.append("--no-sync")
        result = self._pg(cmd, check=False, timeout=300)
        if result.returncode != 0:
            raise ClusterError(f"initdb failed: {result.stdout.strip()}\n{result.stderr.strip()}")
        # initdb's pg_hba.conf only admits loopback (local, 127.0.0.1/32, ::1/128).
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(f"\ninclude_if_exists = '{_RUNTIME_CONF}'\n")

    def _check_major_version(self) -> None:
        assert self._bin is not None
        cluster_major = (self.data_dir / "PG_VERSION").read_text().strip()
        binary_major = pg_version(self._bin).split(".")[0]
        if cluster_major != binary_major:
            raise ClusterError(
                f"{self.data_dir} holds a PostgreSQL {cluster_major} cluster but the binaries in "
                f"{self._bin} are version {binary_major}; set AIRGATE_PG_BIN to matching ones"
            )

    def _write_runtime_conf(self, port: int) -> None:
        lines = [
            "listen_addresses = '127.0.0.1'",
            f"port = {port}",
            f"unix_socket_directories = {_quote_conf(str(self.socket_dir))}",
        ]
        if self._fast:
            lines += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        path = self.data_dir / _RUNTIME_CONF
        path.write_text("# Written by airgate on every start; edits are lost.\n"
                        + "\n".join(lines) + "\n", encoding="utf-8")
        if self._os_user is not None:
            user = pwd.getpwnam(self._os_user)
            os.chown(path, user.pw_uid, user.pw_gid)

    # -- running ------------------------------------------------------------------------------

    def _start_server(self) -> None:
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(attempts):
            port = self._requested_port or _free_port()
            self._write_runtime_conf(port)
            result = self._pg(
                ["pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w",
                 "-t", str(_START_TIMEOUT_S), "start"],
                check=False,
                timeout=_START_TIMEOUT_S + 30,
            )
            if result.returncode == 0:
                self._port = port
                return
            # Someone may have taken the port we probed; only then is another try useful.
            if attempt + 1 < attempts and not _port_is_free(port):
                continue
            raise ClusterError(
                f"pg_ctl start failed for {self.data_dir}: {result.stderr.strip()}"
                f"{self._log_tail()}"
            )

    def _running_postmaster(self) -> int | None:
        """Port of the live postmaster on our data dir; removes a stale postmaster.pid."""
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            try:
                lines = pid_file.read_text().splitlines()
            except FileNotFoundError:
                return None
            if len(lines) < 4 or not lines[0].strip().isdigit():
                # Being written by a postmaster that is starting right now.
                if time.monotonic() > deadline:
                    raise ClusterError(f"{pid_file} is unreadable: {lines!r}")
                time.sleep(0.1)
                continue
            if not _is_postgres_process(int(lines[0])):
                # Left behind by a crash or a container restart; the pid may even be reused.
                with contextlib.suppress(FileNotFoundError):
                    pid_file.unlink()
                return None
            status = lines[7].strip() if len(lines) > 7 else "ready"
            if status == "ready":
                return int(lines[3])
            if time.monotonic() > deadline:
                raise ClusterError(f"postmaster on {self.data_dir} stuck in state {status!r}")
            time.sleep(0.1)

    def _ensure_database(self, name: str) -> None:
        query = f"SELECT 1 FROM pg_database WHERE datname = '{name}'"
        if self.psql(query):
            return
        try:
            self.create_database(name)
        except ClusterError:
            if not self.psql(query):  # not a concurrent starter winning the race
                raise

    def _pg(
        self, cmd: list[str], *, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        assert self._bin is not None
        full = [str(self._bin / cmd[0]), *cmd[1:]]
        if self._os_user is not None:
            full = as_user(self._os_user, full)
        return run_command(full, timeout=timeout, check=check)

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"\n--- tail of {self.log_file} ---\n" + "\n".join(lines[-_LOG_TAIL_LINES:])


# -- helpers ------------------------------------------------------------------------------------


def _socket_dir_for(data_dir: Path) -> Path:
    beside = data_dir.parent / f"{data_dir.name}.sock"
    if len(str(beside)) <= _SOCKET_PATH_MAX:
        return beside
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return Path("/tmp") / f"airgate-pg-{digest}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _is_postgres_process(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() in ("postgres", "postmaster")
    except OSError:
        return False


def _quote_ident(name: str) -> str:
    if not _IDENTIFIER.fullmatch(name):
        raise ClusterError(f"invalid database name {name!r}")
    return f'"{name}"'


def _quote_conf(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
