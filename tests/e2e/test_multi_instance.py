"""Two gateways on one database: a change made through one reaches the other."""

from __future__ import annotations

import httpx
import openai
import pytest
import trio

from proxy.sessions import issue_token
from tests.e2e.conftest import eventually, gateway_settings, in_thread, start_gateway

CHAT = [{"role": "user", "content": "hi"}]


async def test_revocation_and_key_changes_reach_the_other_instance(
    nursery: trio.Nursery, pg_dsn: str, mock_url: str
) -> None:
    a, a_done = await start_gateway(nursery, gateway_settings(pg_dsn), mock_url)
    b, b_done = await start_gateway(nursery, gateway_settings(pg_dsn), mock_url)
    key_row = await a.add_key()  # added through A's pool only...
    user_id, key = await a.add_user()
    await a.gw.events.upstream_key_changed(key_row.id)  # ...as the admin API would publish

    async def b_has_the_key() -> bool:
        return key_row.id in b.gw.pool.actors

    await eventually(b_has_the_key)
    client_b = b.client(key)
    reply = await in_thread(client_b.chat.completions.create, model="deepseek-v4-flash",
                            messages=CHAT)
    assert reply.choices[0].message.content

    token = issue_token(a.gw.jwt_secret, user_id, "user", 3600)
    async with httpx.AsyncClient(base_url=a.base_url) as api:
        revoked = await api.request("DELETE", "/api/auth/apikey", json={"api_key": key},
                                    headers={"authorization": f"Bearer {token}"})
    assert revoked.status_code == 200

    async def b_refuses() -> bool:
        try:
            await in_thread(client_b.models.list)
        except openai.AuthenticationError:
            return True
        return False

    await eventually(b_refuses)
    with pytest.raises(openai.AuthenticationError):
        await in_thread(client_b.chat.completions.create, model="deepseek-v4-flash",
                        messages=CHAT)
    for h, done in ((a, a_done), (b, b_done)):
        h.close_clients()
        h.stop.set()
        with trio.fail_after(20):
            await done.wait()
