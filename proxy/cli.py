"""The ``airgate`` command: serve, demo, mock-upstream, migrate."""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import sys
from functools import partial
from typing import Any

import trio

from loadtest.mock_upstream import MockConfig
from loadtest.mock_upstream import main as mock_main
from observability.logs import configure_logging
from proxy.settings import Settings, SettingsError, load_settings


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML settings file (also AIRGATE_CONFIG)")
    parser.add_argument("--host", help="listen address (AIRGATE_HOST)")
    parser.add_argument("--port", type=int, help="listen port (AIRGATE_PORT)")
    parser.add_argument("--database-url", help="Postgres URL; empty runs an embedded cluster")
    parser.add_argument("--data-dir", help="where the embedded cluster lives")
    parser.add_argument("--workers", type=int, help="worker processes (AIRGATE_WORKERS)")
    parser.add_argument("--log-level", help="debug, info, warning, error")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        "host": args.host, "port": args.port, "database_url": args.database_url,
        "data_dir": args.data_dir, "workers": args.workers, "log_level": args.log_level,
    }
    return load_settings(overrides, config_file=args.config)


def _raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one: every open stream holds two
    sockets (the client's and its upstream's), and 1024 is a common default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logging.getLogger("airgate").warning("open-files limit stays %s: %s", soft, exc)


def _check_listen(host: str, port: int) -> None:
    """Exit with a one-line message if ``host:port`` cannot be listened on (another
    gateway runs there, say), before the database or anything else is started."""
    from proxy.supervisor import listen_socket

    if port == 0:
        return
    try:
        listen_socket(host, port, 1).close()
    except OSError as exc:
        print(f"airgate: cannot listen on {host}:{port}: {exc.strerror or exc}",
              file=sys.stderr)
        raise SystemExit(1) from None


# Python's cyclic GC runs a young collection every 700 net allocations and, with thousands
# of streams open, full collections that walk every live object (loadtest/bench/streams
# saw 1.5 s pauses at 9,000 open streams, and the scheduler lag they cause made the
# admission control refuse new streams). Reference counting frees almost everything the
# hot path allocates; the collector only has to find the rare cycles, so it runs ~70x
# less often, and the modules loaded at start-up are frozen out of its walks.
_GC_THRESHOLDS = (50_000, 20, 100)


def _tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="airgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="run the gateway")
    _common(serve_parser)
    serve_parser.add_argument("--worker-slot", help=argparse.SUPPRESS)  # set by --workers
    demo = sub.add_parser("demo", help="run the gateway with a mock upstream and a demo user")
    _common(demo)
    demo.add_argument("--ttft-ms", type=float, default=0.0)
    demo.add_argument("--chunk-delay-ms", type=float, default=0.0)
    _common(sub.add_parser("migrate", help="apply database migrations and exit"))
    sub.add_parser("mock-upstream", help="run the mock upstream on its own", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "mock-upstream":
        mock_main(rest)
        return
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        settings = _settings(args)
    except SettingsError as exc:
        print(f"airgate: invalid settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    if args.command in ("serve", "demo"):
        _raise_open_files_limit()
        if not getattr(args, "worker_slot", None):  # a worker's socket is its supervisor's
            _check_listen(settings.host, settings.port)
    if args.command == "serve" and settings.workers > 1:
        from proxy.supervisor import run_workers

        raise SystemExit(run_workers(settings))
    if args.command == "serve":
        from proxy.serve import WorkerSlot, serve

        slot = None
        if args.worker_slot:
            index, count, fd = (int(part) for part in args.worker_slot.split("/"))
            slot = WorkerSlot(index, count, fd)
        _tune_gc()
        trio.run(partial(serve, settings, slot=slot))
    elif args.command == "demo":
        from proxy.demo import run_demo

        _tune_gc()
        trio.run(run_demo, settings,
                 MockConfig(ttft_ms=args.ttft_ms, chunk_delay_ms=args.chunk_delay_ms))
    elif args.command == "migrate":
        from proxy.migrate import migrate

        trio.run(migrate, settings)


if __name__ == "__main__":
    main()
