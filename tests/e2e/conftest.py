"""End-to-end harness: a real gateway (``serve``) on loopback, the real mock upstream, a
fresh Postgres database per test, and the official ``openai`` SDK as the client.

The SDK is synchronous here and runs in a worker thread (``trio.to_thread``), so its
HTTP traffic crosses real sockets to the gateway running in this trio run.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pytest
import trio

from loadtest.mock_upstream import MockConfig, run_mock_upstream
from proxy.gateway import Gateway
from proxy.serve import serve
from proxy.settings import Settings
from store.apikeys import create_api_key
from store.upstream_keys import UpstreamKey, create_upstream_key
from store.users import create_user

T = TypeVar("T")

ADMIN_EMAIL = "admin@airgate.test"
ADMIN_PASSWORD = "admin-password-1"
MODELS = ["deepseek-v4-flash", "gpt-4o-mini", "text-embedding-3-small"]


@dataclass
class Harness:
    gw: Gateway
    base_url: str
    mock_url: str
    stop: trio.Event
    users: list[str] = field(default_factory=list)
    clients: list[openai.OpenAI] = field(default_factory=list)

    async def add_key(self, secret: str = "mock-healthy", **values: Any) -> UpstreamKey:
        row = {"name": values.pop("name", secret), "base_url": self.mock_url,
               "api_key": secret, "models": MODELS, **values}
        key = await create_upstream_key(self.gw.db, row)
        await self.gw.pool.put(key)
        return key

    async def add_user(self, *, token_limit: int = 1_000_000, plan: str | None = None,
                       expires_in_s: float | None = 86400.0) -> tuple[str, str]:
        """A user with quota and one API key; returns ``(user_id, sk-key)``."""
        user = await create_user(self.gw.db, email=f"u{len(self.users)}@airgate.test",
                                 password_hash="scrypt$unused", token_limit=token_limit)
        expires = None if expires_in_s is None else \
            datetime.now(UTC) + timedelta(seconds=expires_in_s)
        await self.gw.db.execute("UPDATE users SET plan = $2, expires_at = $3 WHERE id = $1",
                                 user.id, plan, expires)
        _, secret = await create_api_key(self.gw.db, user.id)
        self.users.append(user.id)
        return user.id, secret

    def client(self, api_key: str, **kwargs: Any) -> openai.OpenAI:
        client = openai.OpenAI(api_key=api_key, base_url=self.base_url + "/v1",
                               max_retries=kwargs.pop("max_retries", 0),
                               timeout=kwargs.pop("timeout", 20.0), **kwargs)
        self.clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()

    async def usage_rows(self, user_id: str) -> list[dict[str, Any]]:
        """The user's usage rows once every record handed to the batcher is written."""
        rows = await self.gw.db.fetch(
            "SELECT * FROM usage_records WHERE user_id = $1 ORDER BY created_at", user_id)
        return [dict(r) for r in rows]

    async def wait_for_usage(self, user_id: str, count: int) -> list[dict[str, Any]]:
        with trio.fail_after(10):
            while True:
                rows = await self.usage_rows(user_id)
                if len(rows) >= count:
                    return rows
                await trio.sleep(0.02)

    async def mock_stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            response = await client.get(self.mock_url.removesuffix("/v1") + "/_mock/stats")
            data: dict[str, Any] = response.json()
            return data


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def assert_api_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """``response`` is the /api error shape with ``status``; returns the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["code"], str)
    assert error["code"]
    assert "Traceback" not in response.text
    return dict(error)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Wait until ``check()`` holds: state that lives in another server, read by polling."""
    with trio.fail_after(timeout_s):
        while True:
            if await check():
                return
            await trio.sleep(0.01)


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking SDK call off the event loop."""
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))


def gateway_settings(dsn: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": dsn, "host": "127.0.0.1", "port": 0, "flush_interval_s": 0.05,
        "admin_email": ADMIN_EMAIL, "admin_password": ADMIN_PASSWORD,
        "first_byte_timeout_s": 5.0, "idle_timeout_s": 5.0, "shutdown_grace_s": 5.0,
        "dispatch_wait_s": 1.0, "jwt_secret": "test-secret-" + "x" * 32,
        # The mock upstream and the test's own clients share this process's scheduler, so
        # its lag says nothing about the gateway: lag-based shedding is tested on its own.
        "overload_lag_ms": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def mock_url(nursery: trio.Nursery) -> str:
    port = await nursery.start(partial(run_mock_upstream, MockConfig()))
    return f"http://127.0.0.1:{port}/v1"


async def run_gateway(
    settings: Settings, stop: trio.Event, ready: dict[str, Gateway], done: trio.Event,
    *, task_status: trio.TaskStatus[list[str]],
) -> None:
    async def on_ready(gw: Gateway, binds: list[str]) -> None:
        ready["gw"] = gw

    try:
        await serve(settings, stop=stop, on_ready=on_ready, task_status=task_status)
    finally:
        done.set()


async def start_gateway(
    nursery: trio.Nursery, settings: Settings, mock_url: str
) -> tuple[Harness, trio.Event]:
    stop, done = trio.Event(), trio.Event()
    ready: dict[str, Gateway] = {}
    binds = await nursery.start(partial(run_gateway, settings, stop, ready, done))
    return Harness(ready["gw"], binds[0], mock_url, stop), done


@pytest.fixture
async def harness(
    nursery: trio.Nursery, pg_dsn: str, mock_url: str
) -> AsyncIterator[Harness]:
    h, done = await start_gateway(nursery, gateway_settings(pg_dsn), mock_url)
    yield h
    h.close_clients()
    h.stop.set()
    with trio.fail_after(20):
        await done.wait()


# -- the ``airgate`` command as a child process ------------------------------------------

AIRGATE = [sys.executable, "-m", "proxy.cli"]


def cli_env(**extra: str) -> dict[str, str]:
    """This environment without any ``AIRGATE_*`` of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRGATE_")}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def serving(log_dir: Path, **settings: str) -> AsyncIterator[tuple[trio.Process, str]]:
    """``airgate serve`` in a child process on a free port with these ``AIRGATE_*``
    settings; yields the process and its base URL once ``/api/health`` answers, and kills
    it on the way out if it is still running."""
    port = free_port()
    log = (log_dir / "serve.log").open("wb")
    proc = await trio.lowlevel.open_process(
        [*AIRGATE, "serve"], env=cli_env(AIRGATE_PORT=str(port), **settings),
        stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        async def up() -> bool:
            try:
                async with httpx.AsyncClient(timeout=5) as client:
                    return (await client.get(base + "/api/health")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(up, timeout_s=60)
        yield proc, base
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
        log.close()
