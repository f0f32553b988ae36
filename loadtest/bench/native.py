"""Native load tools for figures the Python ones would distort: nginx as an upstream that
answers every request with the same bytes, and wrk as the load generator.

Owns :func:`nginx_conf`, :func:`start_nginx`, :func:`wrk_script`, :func:`run_wrk` and
:func:`parse_wrk`. On two cores the Python mock and generator take ~0.8 of a core at
the rates one gateway worker serves, which leaves a second worker nothing to run on;
nginx and wrk take a few hundredths of one (``loadtest.bench.scaling`` prints what they
used). Both come from the system (``scripts/bench-tools`` installs them on Debian).
Must not import ``proxy``, ``workers`` or ``store``.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.bench.processes import BenchSetupError, Server, free_port, launch

INSTALL_HINT = "install them with scripts/bench-tools (Debian: apt-get install wrk nginx-light)"


def require(*tools: str) -> dict[str, str]:
    """The path of each tool, or BenchSetupError naming the missing ones."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # nginx
    found = {tool: shutil.which(tool, path=path) for tool in tools}
    missing = [tool for tool, path in found.items() if path is None]
    if missing:
        raise BenchSetupError(f"{', '.join(missing)} not found: {INSTALL_HINT}")
    return {tool: path for tool, path in found.items() if path is not None}


def nginx_conf(workdir: Path, port: int, content_type: str) -> str:
    """One worker process answering every request on ``port`` with the file ``answer`` in
    ``workdir``. nginx serves files to GETs only, and its config cannot hold a stream's
    answer (its parameters stop at 4 KiB): a POST gets 405, which ``error_page`` turns into
    a 200 with the file. Run as root, its worker would switch to an unprivileged user that
    may not reach ``workdir``: it stays root."""
    return (
        ("user root;\n" if os.geteuid() == 0 else "")
        + "worker_processes 1;\n"
        "daemon off;\n"
        f"pid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/nginx-error.log warn;\n"
        "events { worker_connections 8192; }\n"
        "http {\n"
        "  access_log off;\n"
        "  keepalive_requests 100000000;\n"
        "  client_body_buffer_size 64k;\n"
        f"  server {{\n    listen 127.0.0.1:{port};\n    root {workdir};\n"
        "    location / { error_page 405 =200 /answer; return 405; }\n"
        f"    location = /answer {{ internal; default_type {content_type}; }}\n"
        "  }\n"
        "}\n"
    )


def start_nginx(workdir: Path, body: bytes, content_type: str) -> Server:
    """nginx (from PATH) in the foreground answering with ``body``; waits until it listens."""
    nginx = require("nginx")["nginx"]
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (workdir / "answer").write_bytes(body)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, port, content_type))
    return launch("nginx", [nginx, "-c", str(conf), "-p", str(workdir)], port, workdir,
                  timeout_s=10)


def _lua_string(text: str) -> str:
    """A Lua long string holding ``text`` (its level chosen so ``text`` cannot end it)."""
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


def wrk_script(body: bytes, api_key: str | None) -> str:
    """A wrk script: POST ``body`` as JSON; at the end, print the count of each status and
    the p50/p99 latency in microseconds (wrk's own summary does not split statuses)."""
    auth = (f'wrk.headers["Authorization"] = {_lua_string("Bearer " + api_key)}\n'
            if api_key else "")
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = {_lua_string(body.decode())}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"{auth}"
        "local threads = {}\n"
        "function setup(thread) table.insert(threads, thread) end\n"
        "function init(args) counts = {} end\n"
        "function response(status, headers, body)\n"
        "  counts[status] = (counts[status] or 0) + 1\n"
        "end\n"
        "function done(summary, latency, requests)\n"
        "  local total = {}\n"
        "  for _, thread in ipairs(threads) do\n"
        '    for status, n in pairs(thread:get("counts")) do\n'
        "      total[status] = (total[status] or 0) + n\n"
        "    end\n"
        "  end\n"
        "  for status, n in pairs(total) do\n"
        '    io.write(string.format("status %d %d\\n", status, n))\n'
        "  end\n"
        '  io.write(string.format("latency_us %d %d\\n", latency:percentile(50),'
        " latency:percentile(99)))\n"
        "end\n"
    )


@dataclass
class WrkResult:
    duration_s: float
    statuses: dict[int, int] = field(default_factory=dict)
    socket_errors: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_s: float = 0.0  # wrk's own CPU time

    def rate(self, status: int) -> float:
        return self.statuses.get(status, 0) / self.duration_s

    @property
    def other(self) -> int:
        """Answers that are neither 200 nor 429, and socket errors."""
        return sum(n for s, n in self.statuses.items() if s not in (200, 429)) \
            + self.socket_errors


_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_STATUS = re.compile(r"^status (\d+) (\d+)$", re.MULTILINE)
_LATENCY = re.compile(r"^latency_us (\d+) (\d+)$", re.MULTILINE)


def parse_wrk(output: str, duration_s: float) -> WrkResult:
    """What a run of :func:`wrk_script` printed."""
    latency = _LATENCY.search(output)
    if latency is None:
        raise BenchSetupError(f"wrk printed no summary:\n{output[-2000:]}")
    result = WrkResult(duration_s)
    result.statuses = {int(s): int(n) for s, n in _STATUS.findall(output)}
    errors = _SOCKET_ERRORS.search(output)
    if errors:
        result.socket_errors = sum(int(n) for n in errors.groups())
    result.p50_ms, result.p99_ms = (int(v) / 1000 for v in latency.groups())
    return result


def run_wrk(url: str, script: Path, *, connections: int, duration_s: float,
            threads: int = 1) -> WrkResult:
    """Run wrk (from PATH) against ``url`` and parse its figures, with its CPU time.
    wrk takes whole seconds: ``duration_s`` is rounded, to 1 s at least."""
    duration_s = max(1, round(duration_s))
    wrk = require("wrk")["wrk"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--timeout", "30s",
         "-s", str(script), url],
        capture_output=True, text=True, check=False, timeout=duration_s + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise BenchSetupError(f"wrk failed ({done.returncode}): "
                              f"{(done.stdout + done.stderr)[-2000:]}")
    result = parse_wrk(done.stdout, duration_s)
    result.cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result
