"""Settings: one frozen, validated object built from ``AIRGATE_*`` variables.

Owns the list of settings, their types, defaults and validation. Sources, lowest
precedence first: defaults, an optional TOML file (``AIRGATE_CONFIG`` or ``--config``),
``AIRGATE_*`` environment variables, command-line flags. Unknown keys are rejected.
Imports nothing from the gateway.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "AIRGATE_"


class SettingsError(ValueError):
    """A setting is unknown or has a value that does not validate."""


def _default_data_dir() -> str:
    if os.geteuid() == 0:
        # /root is usually mode 700; the unprivileged Postgres user must reach the cluster.
        return "/var/lib/airgate"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "airgate")


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting airgate reads. Units are in the names."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    database_url: str = ""  # empty: run an embedded cluster in data_dir
    data_dir: str = dataclasses.field(default_factory=_default_data_dir)
    db_pool_size: int = 10
    jwt_secret: str = ""  # empty: generated once and persisted in the database
    jwt_ttl_s: int = 7 * 24 * 3600
    admin_email: str = ""
    admin_password: str = ""
    max_body_bytes: int = 4 * 1024 * 1024
    connect_timeout_s: float = 10.0
    first_byte_timeout_s: float = 120.0
    idle_timeout_s: float = 120.0
    ping_interval_s: float = 15.0
    max_attempts: int = 3
    dispatch_wait_s: float = 2.0
    max_waiting_requests: int = 512  # waiting for a first upstream byte; more get 429
    listen_backlog: int = 2048  # the kernel's accept queue (capped by net.core.somaxconn)
    overload_lag_ms: float = 3.0  # sustained lag (while saturated) that shrinks admission; 0: off
    refusal_hold_ms: float = 0.0  # hold a refusal back before its retry-after this long; 0: off
    actor_inbox_size: int = 64
    flush_interval_s: float = 1.0
    flush_batch_size: int = 500
    shutdown_grace_s: float = 30.0
    upstream_max_connections: int = 1000
    order_ttl_s: int = 300  # a pending wxpay order (and its QR code) expires after this
    invite_rebate_percent: int = 10  # of each invitee's confirmed payment, to the inviter
    reconcile_interval_s: float = 60.0  # query pending orders whose notification is late
    public_url: str = ""  # where WeChat Pay reaches us; empty: http://host:port
    login_failures_per_account: int = 5  # failed logins per 15 min before 429
    login_failures_per_ip: int = 20
    log_level: str = "info"
    access_log: bool = True
    direct_send: bool = True  # write to a client socket at once when it has room
    upstream_pump: bool = True  # one task reads every stream's upstream socket

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not 0 <= self.port <= 65535:
            problems.append("port must be within 0..65535")
        if self.workers < 1:
            problems.append("workers must be at least 1")
        positive = (
            "db_pool_size", "jwt_ttl_s", "max_body_bytes", "connect_timeout_s",
            "first_byte_timeout_s", "idle_timeout_s", "ping_interval_s", "max_attempts",
            "dispatch_wait_s", "max_waiting_requests", "actor_inbox_size", "listen_backlog",
            "flush_interval_s", "flush_batch_size",
            "upstream_max_connections", "order_ttl_s", "reconcile_interval_s",
            "login_failures_per_account", "login_failures_per_ip",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive")
        if not 0 <= self.invite_rebate_percent <= 100:
            problems.append("invite_rebate_percent must be within 0..100")
        for name in ("shutdown_grace_s", "overload_lag_ms"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        if not 0 <= self.refusal_hold_ms <= 10_000:
            problems.append("refusal_hold_ms must be within 0..10000")
        if self.log_level not in {"debug", "info", "warning", "error"}:
            problems.append("log_level must be one of debug, info, warning, error")
        if bool(self.admin_email) != bool(self.admin_password):
            problems.append("admin_email and admin_password go together")
        if self.database_url and not self.database_url.startswith(("postgres://", "postgresql://")):
            problems.append("database_url must be a postgresql:// URL")
        if problems:
            raise SettingsError("; ".join(problems))


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    """Convert one raw value (str from env/flags, or a TOML scalar) to the field's type."""
    try:
        if kind in ("bool", bool):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(raw)
        if kind in ("int", int):
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if kind in ("float", float):
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        return str(raw)
    except ValueError:
        raise SettingsError(f"{name}: cannot read {raw!r} as {kind}") from None


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Build settings from a TOML file, the environment and explicit overrides (flags)."""
    env = os.environ if environ is None else environ
    known = {f.name: f.type for f in fields(Settings)}
    values: dict[str, Any] = {}

    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"config file {path}: {exc}") from exc
        for key, raw in table.items():
            if key not in known:
                raise SettingsError(f"config file {path}: unknown setting {key!r}")
            values[key] = _coerce(key, known[key], raw)

    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        key = var[len(ENV_PREFIX):].lower()
        if key.startswith(("test_", "wxpay_", "pg_")):
            continue  # read by the test suite, the payment provider and store.cluster
        if key not in known:
            raise SettingsError(f"unknown environment variable {var}")
        values[key] = _coerce(key, known[key], raw)

    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in known:
            raise SettingsError(f"unknown setting {key!r}")
        values[key] = _coerce(key, known[key], raw)
    return Settings(**values)
