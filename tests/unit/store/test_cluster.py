"""store.cluster against real PostgreSQL binaries: no mocks, a throwaway cluster per test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from store.cluster import (
    SHARED_INSTALL_DIR,
    ClusterError,
    EmbeddedCluster,
    find_pg_bin,
    pg_version,
)
from tests.conftest import make_reachable_tmp_dir

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="exercises the run-as-root path")


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = make_reachable_tmp_dir("airgate-cluster-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(workdir: Path) -> Iterator[EmbeddedCluster]:
    instance = EmbeddedCluster(workdir / "data", fast=True)
    yield instance
    instance.stop()


def test_find_pg_bin_has_the_server_binaries() -> None:
    bin_dir = find_pg_bin()
    for name in ("initdb", "pg_ctl", "postgres"):
        assert os.access(bin_dir / name, os.X_OK)
    assert pg_version(bin_dir)[0].isdigit()


def test_find_pg_bin_prefers_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = find_pg_bin()
    monkeypatch.setenv("AIRGATE_PG_BIN", str(bundled))
    assert find_pg_bin() == bundled
    monkeypatch.setenv("AIRGATE_PG_BIN", "/nonexistent/bin")
    with pytest.raises(ClusterError, match="AIRGATE_PG_BIN"):
        find_pg_bin()


def test_start_stop_restart_reuses_the_cluster(cluster: EmbeddedCluster) -> None:
    dsn = cluster.start()
    assert dsn == f"postgresql://airgate@127.0.0.1:{cluster.port}/airgate"
    assert cluster.psql("SELECT current_user", database="airgate") == "airgate"
    assert cluster.psql("SHOW listen_addresses") == "127.0.0.1"
    assert cluster.psql("SHOW fsync") == "off"
    cluster.psql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)", database="airgate")
    cluster.stop()
    assert not (cluster.data_dir / "postmaster.pid").exists()
    cluster.stop()  # stopping a stopped cluster is a no-op

    again = EmbeddedCluster(cluster.data_dir, port=cluster.port)  # durable settings now
    assert again.start() == dsn
    assert again.psql("SELECT x FROM kept", database="airgate") == "7"
    assert again.psql("SHOW fsync") == "on"


def test_start_adopts_a_running_cluster(cluster: EmbeddedCluster) -> None:
    dsn = cluster.start()
    with EmbeddedCluster(cluster.data_dir) as other:
        assert other.dsn == dsn
    # The context manager stopped the shared server.
    assert not (cluster.data_dir / "postmaster.pid").exists()


def test_start_refuses_a_different_port_for_a_running_cluster(cluster: EmbeddedCluster) -> None:
    cluster.start()
    with pytest.raises(ClusterError, match="already running"):
        EmbeddedCluster(cluster.data_dir, port=cluster.port + 1).start()


def test_stale_postmaster_pid_is_ignored(cluster: EmbeddedCluster) -> None:
    cluster.start()
    pid_file = cluster.data_dir / "postmaster.pid"
    contents = pid_file.read_text().splitlines()
    cluster.stop()
    # As after a crash or container restart: the file names a process that is gone.
    pid_file.write_text("\n".join([str(_exited_pid()), *contents[1:]]) + "\n")
    assert cluster.start().startswith("postgresql://")
    assert cluster.psql("SELECT 1") == "1"


def _exited_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_create_database(cluster: EmbeddedCluster) -> None:
    cluster.start()
    cluster.psql("CREATE TABLE seed (x int); INSERT INTO seed VALUES (1)", database="airgate")
    dsn = cluster.create_database("copy_1", template="airgate")
    assert dsn.endswith("/copy_1")
    assert cluster.psql("SELECT x FROM seed", database="copy_1") == "1"
    cluster.drop_database("copy_1")
    assert cluster.psql("SELECT count(*) FROM pg_database WHERE datname = 'copy_1'") == "0"
    with pytest.raises(ClusterError, match="invalid database name"):
        cluster.create_database('x"; DROP DATABASE airgate; --')


def test_start_failure_reports_the_log_tail(workdir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        failing = EmbeddedCluster(workdir / "data", port=taken.getsockname()[1], fast=True)
        with pytest.raises(ClusterError, match="tail of") as error:
            failing.start()
    assert "could not" in str(error.value)


@as_root
def test_unreachable_data_dir_is_a_clear_error() -> None:
    private = Path(os.environ.get("TMPDIR", "/tmp")) / f"airgate-private-{os.getpid()}"
    private.mkdir(mode=0o700)
    try:
        with pytest.raises(ClusterError, match="cannot reach"):
            EmbeddedCluster(private / "data", fast=True).start()
        assert oct(private.stat().st_mode & 0o777) == oct(0o700)  # parents left alone
    finally:
        shutil.rmtree(private, ignore_errors=True)


@as_root
def test_unreachable_binaries_are_copied_once(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lay out a private copy like a wheel in a venv under /root: site/<pkg>/<install>/bin
    # with the wheel's libraries in site/<pkg>.libs, which the binaries' rpath names.
    source = find_pg_bin()
    package = source.parent.parent.name
    private = workdir / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    install = private / "site" / package / source.parent.name
    shutil.copytree(source.parent, install, symlinks=True)
    libs = source.parent.parent.parent / f"{package}.libs"
    if libs.is_dir():
        shutil.copytree(libs, private / "site" / libs.name, symlinks=True)
    monkeypatch.setenv("AIRGATE_PG_BIN", str(install / "bin"))

    with EmbeddedCluster(workdir / "data", fast=True) as cluster:
        assert cluster.psql("SELECT 1") == "1"
    copied = SHARED_INSTALL_DIR / f"pg-{pg_version(source)}" / package / source.parent.name / "bin"
    assert (copied / "postgres").exists()
    assert oct(private.stat().st_mode & 0o777) == oct(0o700)  # parents left alone


def test_a_leaving_process_leaves_a_cluster_another_one_still_uses(
    cluster: EmbeddedCluster,
) -> None:
    """A second gateway on the same data directory (one that failed to start, say) must
    not take the database away from the first when it leaves; the last one out stops it."""
    cluster.start()
    first = subprocess.Popen(  # the first gateway's connection, open and idle
        [str(find_pg_bin() / "psql"), "-X", "-q", "-h", "127.0.0.1", "-p", str(cluster.port),
         "-U", "airgate", "-d", "airgate"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        second = EmbeddedCluster(cluster.data_dir)
        second.start()  # adopts the running server
        query = ("SELECT count(*) FROM pg_stat_activity"
                 " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
        _until(lambda: second.psql(query) == "1")  # the first's connection is seen
        assert second.stop_unless_in_use() is False
        assert second.psql("SELECT 1") == "1"  # still serving the first
    finally:
        first.kill()
        first.communicate()  # reaps it and closes its stdin
    _until(lambda: cluster.psql(query) == "0")  # the first is gone: its backend goes too
    assert cluster.stop_unless_in_use() is True
    assert not (cluster.data_dir / "postmaster.pid").exists()


def _until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll another process's state (a server's view of its clients) until ``check``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
