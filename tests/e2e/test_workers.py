"""``airgate serve --workers 2``: one port, two processes, limits that hold in total."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import httpx
import trio

from tests.e2e.conftest import MODELS, eventually, serving

CHAT = {"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "hi"}]}


async def test_two_workers_share_one_port_and_a_keys_rpm(
    pg_dsn: str, mock_url: str, tmp_path: Path
) -> None:
    async with serving(tmp_path, AIRGATE_DATABASE_URL=pg_dsn,
                       AIRGATE_ADMIN_EMAIL="root@airgate.test",
                       AIRGATE_ADMIN_PASSWORD="root-pass-1", AIRGATE_WORKERS="2",
                       AIRGATE_ACCESS_LOG="false") as (proc, base):
        # Fresh connections, so the kernel spreads them over both processes.
        async def call(method: str, path: str, **kwargs: object) -> httpx.Response:
            async with httpx.AsyncClient(base_url=base, timeout=20) as client:
                return await client.request(method, path, **kwargs)  # type: ignore[arg-type]

        token = (await call("POST", "/api/admin/login", json={
            "email": "root@airgate.test", "password": "root-pass-1"})).json()["token"]
        auth = {"authorization": f"Bearer {token}"}
        created = await call("POST", "/api/admin/upstream-keys", headers=auth, json={
            "name": "mock", "base_url": mock_url, "api_key": "mock-ok", "models": MODELS,
            "rpm": 4})
        assert created.status_code == 201
        user = (await call("POST", "/api/auth/register", json={
            "email": "w@airgate.test", "password": "password-1"})).json()
        key = (await call("POST", "/api/auth/apikey", headers={
            "authorization": f"Bearer {user['token']}"})).json()["api_key"]
        await call("PATCH", f"/api/admin/users/{user['user']['id']}", headers=auth,
                   json={"tokenLimit_delta": 100_000})
        workers_with_key: set[str] = set()

        async def both_workers_know_the_key() -> bool:
            text = (await call("GET", "/metrics")).text
            worker = re.search(r'airgate_worker\{index="(\d+)"\}', text)
            if worker and "airgate_upstream_key_health{" in text:
                workers_with_key.add(worker.group(1))
            return workers_with_key == {"0", "1"}

        await eventually(both_workers_know_the_key, timeout_s=20)
        statuses = [(await call("POST", "/v1/chat/completions", json=CHAT,
                                headers={"authorization": f"Bearer {key}"})).status_code
                    for _ in range(12)]
        # rpm 4 in total: each process owns 2, so at most 4 succeed within the minute.
        assert 2 <= statuses.count(200) <= 4
        assert all(s in (200, 429) for s in statuses)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(40):
            assert await proc.wait() == 0
