"""Finding PostgreSQL server binaries, and making them runnable by an unprivileged user.

Owns the search for ``initdb``/``pg_ctl``/``postgres`` (``$AIRGATE_PG_BIN``, the pgserver
wheel's bundled binaries, Debian's ``/usr/lib/postgresql/*/bin``, ``PATH``), the system
user the cluster runs as when we are root (``postgres``, else ``airgate-pg``, created
once), and the world-readable copy of the install tree that user gets when it cannot
reach the original (a venv under ``/root``). Used by :mod:`store.cluster`; synchronous,
subprocess only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path

FALLBACK_OS_USER = "airgate-pg"
SHARED_INSTALL_DIR = Path("/var/lib/airgate")

_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")


class ClusterError(RuntimeError):
    """The embedded cluster could not be found, initialised, started or used."""


def find_pg_bin() -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Search order: ``$AIRGATE_PG_BIN``; the binaries bundled in the pgserver wheel; the
    highest ``/usr/lib/postgresql/*/bin``; the directory of ``pg_ctl`` on ``PATH``.
    """
    env = os.environ.get("AIRGATE_PG_BIN")
    if env:
        if not _has_binaries(Path(env)):
            needed = ", ".join(_REQUIRED_BINARIES)
            raise ClusterError(f"AIRGATE_PG_BIN={env} does not hold {needed}")
        return Path(env)
    # find_spec locates the package without importing (and so without running) it.
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            bundled = Path(location) / "pginstall" / "bin"
            if _has_binaries(bundled):
                return bundled
    debian = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if _has_binaries(p)]
    if debian:
        return max(debian, key=lambda p: _version_key(p.parent.name))
    on_path = shutil.which("pg_ctl")
    if on_path:
        for candidate in (Path(on_path).parent, Path(on_path).resolve().parent):
            if _has_binaries(candidate):
                return candidate
    raise ClusterError(
        "no PostgreSQL binaries found: set AIRGATE_PG_BIN, install the pgserver wheel, "
        "or install the postgresql server package"
    )


def pg_version(bin_dir: Path) -> str:
    """Return the server version of the binaries in `bin_dir`, e.g. ``"16.2"``."""
    out = run_command([str(bin_dir / "postgres"), "--version"], timeout=30).stdout
    match = re.search(r"(\d+(?:\.\d+)*)", out)
    if match is None:
        raise ClusterError(f"cannot parse postgres --version output: {out!r}")
    return match.group(1)


def _has_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


def run_command(
    cmd: list[str],
    *,
    timeout: float,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        # cwd="/": the unprivileged user may not be able to enter our working directory.
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                cwd="/", env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterError(f"{cmd[0]} failed: {exc}") from exc
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
    return result


def as_user(user: str, cmd: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd]


def ensure_os_user() -> str:
    for name in ("postgres", FALLBACK_OS_USER):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    result = run_command(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                   FALLBACK_OS_USER], timeout=60, check=False)
    try:
        pwd.getpwnam(FALLBACK_OS_USER)  # exists even if a concurrent useradd won the race
    except KeyError:
        raise ClusterError(
            f"running as root and cannot create system user {FALLBACK_OS_USER!r}: "
            f"{result.stderr.strip()}"
        ) from None
    return FALLBACK_OS_USER


def _user_can_exec(user: str, path: Path) -> bool:
    probe = run_command(as_user(user, ["test", "-x", str(path)]), timeout=30, check=False)
    return probe.returncode == 0


def reachable_install(bin_dir: Path, user: str) -> Path:
    """`bin_dir`, or a world-readable copy of its install tree that `user` can execute."""
    if _user_can_exec(user, bin_dir / "postgres"):
        return bin_dir
    install_root = bin_dir.parent  # holds bin/, lib/, share/
    package_dir = install_root.parent
    dest = SHARED_INSTALL_DIR / f"pg-{pg_version(bin_dir)}"
    # Keep two levels of layout: wheels find their shared libraries through an rpath such
    # as $ORIGIN/../../../pgserver.libs.
    dest_bin = dest / package_dir.name / install_root.name / bin_dir.name
    if not (dest_bin / "postgres").exists():
        for directory in (SHARED_INSTALL_DIR, dest):  # ours: make them traversable
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)
        staging = dest / f".staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        parts = [package_dir.name]
        shutil.copytree(install_root, staging / package_dir.name / install_root.name,
                        symlinks=True)
        wheel_libs = package_dir.parent / f"{package_dir.name}.libs"
        if wheel_libs.is_dir():
            shutil.copytree(wheel_libs, staging / wheel_libs.name, symlinks=True)
            parts.insert(0, wheel_libs.name)  # libraries first: the binaries mark completion
        _make_world_readable(staging)
        for part in parts:
            # rename is atomic; if it fails a concurrent process got there first.
            with contextlib.suppress(OSError):
                (staging / part).rename(dest / part)
        shutil.rmtree(staging, ignore_errors=True)
    if not _user_can_exec(user, dest_bin / "postgres"):
        raise ClusterError(
            f"user {user!r} cannot execute {bin_dir}/postgres nor the copy in {dest_bin}; "
            "set AIRGATE_PG_BIN to binaries that user can reach"
        )
    return dest_bin


def _make_world_readable(root: Path) -> None:
    """chmod go+r (and go+x where u+x) inside our own copy; never above it."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        extra = 0o044 | (0o011 if mode & 0o100 or path.is_dir() else 0)
        path.chmod((mode | extra | (0o100 if path.is_dir() else 0)) & 0o7777)
