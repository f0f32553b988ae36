"""What :mod:`loadtest.bench.streams` watches while the streams run: /proc and the sockets.

Reads a process's VmRSS/VmHWM, its open fds and fd limit, the kernel's listen-queue
overflow counters (/proc/net/netstat, for the whole network namespace), with ``ss`` the
accept queue of one listening port, and the gateway's own gauges from its ``/metrics``
(streams open, scheduler lag, overload shedding). :class:`Watch` samples them
periodically, keeps the maxima and a time series. Must not import ``proxy``, ``workers``
or ``store``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.bench.stats import CLOCK_TICKS, proc_status_kib, read_cpu_ticks


def proc_kib(pid: int, name: str) -> int | None:
    """A ``kB`` field (``VmRSS``, ``VmHWM``) of /proc/<pid>/status."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return proc_status_kib(f.read(), name)
    except OSError:
        return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def fd_limit(pid: int) -> str:
    """``soft (hard N)`` of RLIMIT_NOFILE, from /proc/<pid>/limits."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return f"{soft} (hard {hard})"
    except OSError:
        pass
    return "?"


def listen_counters() -> dict[str, int]:
    """TcpExt ListenOverflows / ListenDrops: accept-queue overflows and dropped SYNs."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {k: int(table[k]) for k in ("ListenOverflows", "ListenDrops") if k in table}
    return {}


def accept_queue(port: int) -> tuple[int, int] | None:
    """(connections waiting to be accepted, backlog) of 127.0.0.1:``port``, from ``ss``."""
    try:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=5, check=False).stdout.split()
        return int(out[1]), int(out[2])
    except (OSError, subprocess.TimeoutExpired, IndexError, ValueError):
        return None


def gateway_log_summary(log: Path, limit: int = 6) -> list[str]:
    """How many lines the gateway logged (warning and up) and its most frequent messages."""
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            text = f"{record.get('level', '?')}: {record.get('msg', line)}"
        except (ValueError, AttributeError):
            text = line
        counts[text[:160]] = counts.get(text[:160], 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return [f"{sum(counts.values())} log lines"] + [f"  {n:6d} x {text}" for text, n in top]


_GAUGES = ("airgate_active_streams", "airgate_scheduler_lag_seconds",
           "airgate_overload_shedding", "airgate_admission_limit",
           "airgate_admitted_requests")
_LIMIT = "airgate_admission_limit"  # its minimum is kept, not its maximum
_SHED = "airgate_shed_requests_total{"


def gateway_gauges(client: httpx.Client) -> dict[str, float]:
    """The gauges above and ``shed:<reason>`` counters from the gateway's /metrics."""
    try:
        text = client.get("/metrics").text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        try:
            if name in _GAUGES:
                out[name] = float(value)
            elif name.startswith(_SHED):
                out["shed:" + name.split('"')[1]] = float(value)
        except (ValueError, IndexError):
            continue
    return out


@dataclass
class Watch:
    """Maxima and a time series of the watched processes while the generators run."""

    pids: dict[str, int]
    listen_port: int
    mock_url: str
    gateway_url: str
    rss_kib: dict[str, int] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)
    mock_active: int = 0
    queue: int = 0
    backlog: int = 0
    gauges: dict[str, float] = field(default_factory=dict)  # maxima
    shedding_samples: int = 0
    series: list[dict[str, Any]] = field(default_factory=list)

    def sample(self, mock: httpx.Client, gateway: httpx.Client) -> None:
        row: dict[str, Any] = {"t": round(time.time(), 2)}
        for name, pid in self.pids.items():
            rss, fds, ticks = proc_kib(pid, "VmRSS"), open_fds(pid), read_cpu_ticks(pid)
            row[name] = {"rss_kib": rss, "fds": fds,
                         "cpu_s": ticks / CLOCK_TICKS if ticks is not None else None}
            if rss is not None:
                self.rss_kib[name] = max(self.rss_kib.get(name, 0), rss)
            if fds is not None:
                self.fds[name] = max(self.fds.get(name, 0), fds)
        try:
            row["mock_active"] = int(mock.get("/_mock/stats").json()["active_streams"])
            self.mock_active = max(self.mock_active, row["mock_active"])
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if (queue := accept_queue(self.listen_port)) is not None:
            row["accept_queue"] = queue[0]
            self.queue, self.backlog = max(self.queue, queue[0]), queue[1]
        row["gateway_metrics"] = gauges = gateway_gauges(gateway)
        for name, value in gauges.items():
            keep = min if name == _LIMIT else max
            self.gauges[name] = keep(self.gauges.get(name, value), value)
        self.shedding_samples += gauges.get("airgate_overload_shedding", 0.0) > 0
        self.series.append(row)

    def run_while(self, running: Any, period_s: float, deadline: float) -> None:
        """Sample every ``period_s`` while ``running()`` and before ``deadline``."""
        with httpx.Client(base_url=self.mock_url, timeout=5) as mock, \
                httpx.Client(base_url=self.gateway_url, timeout=5) as gateway:
            while running() and time.time() < deadline:
                self.sample(mock, gateway)
                time.sleep(period_s)

    def write(self, path: Path) -> None:
        path.write_text("".join(json.dumps(row) + "\n" for row in self.series))
