"""Brute force on /api/auth/login is throttled; honest traffic from one address is not."""

from __future__ import annotations

import httpx

from tests.e2e.conftest import Harness
from tests.e2e.test_api_shop import register


async def test_failed_logins_are_throttled_per_account(harness: Harness) -> None:
    limit = harness.gw.settings.login_failures_per_account
    async with httpx.AsyncClient(base_url=harness.base_url) as api:
        await register(api, "target@airgate.test")
        wrong = {"email": "target@airgate.test", "password": "not-the-password"}
        statuses = [(await api.post("/api/auth/login", json=wrong)).status_code
                    for _ in range(limit)]
        blocked = await api.post("/api/auth/login", json=wrong)
        right = await api.post("/api/auth/login", json={"email": "target@airgate.test",
                                                        "password": "password-123"})
        other = await api.post("/api/auth/login", json={"email": "someone@airgate.test",
                                                        "password": "password-123"})
    assert statuses == [401] * limit
    assert blocked.status_code == 429
    assert blocked.json()["error"]["code"] == "too_many_failed_logins"
    assert int(blocked.headers["retry-after"]) > 0
    assert right.status_code == 429  # the account is locked for the window, even for its owner
    assert other.status_code == 401  # other accounts are not


async def test_failed_logins_are_throttled_per_address(harness: Harness) -> None:
    limit = harness.gw.settings.login_failures_per_ip
    async with httpx.AsyncClient(base_url=harness.base_url) as api:
        statuses = [
            (await api.post("/api/auth/login", json={"email": f"spray{i}@airgate.test",
                                                      "password": "guess-1234"})).status_code
            for i in range(limit + 1)
        ]
    assert statuses == [401] * limit + [429]


async def test_registrations_and_good_logins_from_one_address_are_not_throttled(
    harness: Harness,
) -> None:
    count = harness.gw.settings.login_failures_per_ip + 5
    async with httpx.AsyncClient(base_url=harness.base_url, timeout=30) as api:
        for i in range(count):
            await register(api, f"office{i}@airgate.test")
        logins = [(await api.post("/api/auth/login", json={
            "email": f"office{i}@airgate.test", "password": "password-123"})).status_code
            for i in range(count)]
    assert logins == [200] * count
