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


async def test_a_users_quota_holds_in_total_across_instances(
    nursery: trio.Nursery, pg_dsn: str, mock_url: str
) -> None:
    a, a_done = await start_gateway(nursery, gateway_settings(pg_dsn), mock_url)
    b, b_done = await start_gateway(nursery, gateway_settings(pg_dsn), mock_url)
    for h in (a, b):
        await h.add_key()
    limit = 100
    user_id, key = await a.add_user(token_limit=limit)
    clients = [a.client(key), b.client(key)]
    served = refused = 0

    def stream(client: openai.OpenAI) -> int:
        pieces = 0
        try:
            for chunk in client.chat.completions.create(
                model="deepseek-v4-flash", messages=CHAT, stream=True, max_tokens=20,
                extra_body={"mock": {"chunks": 20}},
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces += 1
        except openai.RateLimitError:
            raise  # refused before the stream started
        except openai.APIError:
            pass  # cut for quota mid-stream
        return pieces

    for i in range(12):
        try:
            await in_thread(stream, clients[i % 2])
            served += 1
        except openai.RateLimitError:
            refused += 1
    assert served >= 3
    assert refused >= 1

    async def all_written() -> bool:
        count = await a.gw.db.fetchval(
            "SELECT count(*) FROM usage_records WHERE user_id = $1", user_id)
        return bool(count == served)

    await eventually(all_written)
    billed = await a.gw.db.fetchval(
        "SELECT sum(prompt_tokens + completion_tokens) FROM usage_records WHERE user_id = $1",
        user_id)
    # Each process spends only tokens leased to it; a stream is cut once it passes its
    # budget, so a request may overrun by the one chunk that crossed the line.
    assert limit - 21 <= billed <= limit + served
    for h, done in ((a, a_done), (b, b_done)):
        h.close_clients()
        h.stop.set()
        with trio.fail_after(20):
            await done.wait()
