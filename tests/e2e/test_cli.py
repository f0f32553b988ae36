"""The ``airgate`` command as a user runs it: embedded Postgres, serve, SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import httpx
import trio

from tests.conftest import make_reachable_tmp_dir
from tests.e2e.conftest import AIRGATE, MODELS, serving
from tests.e2e.conftest import cli_env as _env


def test_migrate_runs_an_embedded_cluster_and_is_idempotent() -> None:
    data = make_reachable_tmp_dir("airgate-cli-")
    try:
        first = subprocess.run([*AIRGATE, "migrate", "--data-dir", str(data)],
                               capture_output=True, text=True, timeout=120, env=_env(),
                               check=False)
        assert first.returncode == 0, first.stderr
        assert "applied: 0001_init, 0002_seed" in first.stdout
        second = subprocess.run([*AIRGATE, "migrate", "--data-dir", str(data)],
                                capture_output=True, text=True, timeout=120, env=_env(),
                                check=False)
        assert second.returncode == 0, second.stderr
        assert "nothing (up to date)" in second.stdout
        assert (data / "pgdata" / "PG_VERSION").exists()
    finally:
        subprocess.run(["rm", "-rf", str(data)], check=False)


def test_invalid_settings_exit_with_a_message_not_a_traceback() -> None:
    result = subprocess.run([*AIRGATE, "serve"], capture_output=True, text=True, timeout=60,
                            env=_env(AIRGATE_PORT="eighty"), check=False)
    assert result.returncode == 2
    assert "invalid settings" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_refused_with_a_message_before_anything_starts() -> None:
    data = make_reachable_tmp_dir("airgate-cli-")
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = str(taken.getsockname()[1])
            for command in ("serve", "demo"):
                result = subprocess.run(
                    [*AIRGATE, command, "--port", port, "--data-dir", str(data)],
                    capture_output=True, text=True, timeout=60, env=_env(), check=False)
                assert result.returncode == 1
                assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
                assert "Traceback" not in result.stderr
        assert not (data / "pgdata").exists()  # no database was started for nothing
    finally:
        subprocess.run(["rm", "-rf", str(data)], check=False)


async def test_sigterm_with_streams_in_flight_loses_no_usage(
    pg_dsn: str, mock_url: str, tmp_path: Path
) -> None:
    async with serving(tmp_path, AIRGATE_DATABASE_URL=pg_dsn,
                       AIRGATE_ADMIN_EMAIL="root@airgate.test",
                       AIRGATE_ADMIN_PASSWORD="root-pass-1",
                       AIRGATE_FLUSH_INTERVAL_S="5") as (proc, base):
        async with httpx.AsyncClient(base_url=base, timeout=20) as api:
            token = (await api.post("/api/admin/login", json={
                "email": "root@airgate.test", "password": "root-pass-1"})).json()["token"]
            auth = {"authorization": f"Bearer {token}"}
            created = await api.post("/api/admin/upstream-keys", headers=auth, json={
                "name": "mock", "base_url": mock_url, "api_key": "mock-ok", "models": MODELS})
            assert created.status_code == 201, created.text
            user = (await api.post("/api/auth/register", json={
                "email": "streamer@airgate.test", "password": "streamer-1"})).json()
            user_auth = {"authorization": f"Bearer {user['token']}"}
            key = (await api.post("/api/auth/apikey", headers=user_auth)).json()["api_key"]
        from store.runtime import open_store

        async with open_store(pg_dsn, pool_size=1) as db:
            await db.execute("UPDATE users SET token_limit = 100000 WHERE id = $1",
                             user["user"]["id"])
        counts: list[int] = []

        async def stream_one(started: trio.Event) -> None:
            body = {"model": "deepseek-v4-flash", "stream": True,
                    "messages": [{"role": "user", "content": "go"}],
                    "mock": {"chunks": 10, "chunk_delay_ms": 60}}
            async with httpx.AsyncClient(timeout=20) as client, client.stream(
                "POST", base + "/v1/chat/completions", json=body,
                headers={"authorization": f"Bearer {key}"},
            ) as response:
                count = 0
                async for line in response.aiter_lines():
                    started.set()
                    if '"content":"tok ' in line:
                        count += 1
                counts.append(count)

        async with trio.open_nursery() as nursery:
            events = [trio.Event() for _ in range(4)]
            for event in events:
                nursery.start_soon(stream_one, event)
            for event in events:
                await event.wait()
            proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await proc.wait() == 0
        assert counts == [10] * 4
        async with open_store(pg_dsn, pool_size=1) as db:
            rows = await db.fetch("SELECT completion_tokens, status FROM usage_records")
        assert sorted((r["completion_tokens"], r["status"]) for r in rows) == [(10, 200)] * 4


async def test_sigterm_closes_keep_alive_connections_that_served_the_account_api(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A keep-alive connection idle after an /api (Quart) request is closed at SIGTERM:
    the process exits at once, not after the whole shutdown grace period (it used to,
    because Quart cancelled hypercorn's after-response bookkeeping)."""
    async with (
        serving(tmp_path, AIRGATE_DATABASE_URL=pg_dsn,
                AIRGATE_SHUTDOWN_GRACE_S="30") as (proc, base),
        httpx.AsyncClient(base_url=base, timeout=10) as api,
    ):
        for _ in range(2):  # the same keep-alive connection, left open and idle
            assert (await api.get("/api/plans")).status_code == 200
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):  # far less than the 30 s grace period
            assert await proc.wait() == 0
