"""Streams through the openai SDK with direct writes on and off (AIRGATE_DIRECT_SEND).

Every other e2e test runs with the default (on); this one checks that a stream is
relayed and billed the same either way (tests/unit/proxy/test_direct_send.py checks which
way the bytes went).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

from tests.e2e.conftest import gateway_settings, in_thread, start_gateway

CHAT = [{"role": "user", "content": "say hello to the gateway"}]


@pytest.mark.parametrize("direct", [True, False])
async def test_a_stream_is_relayed_and_billed_the_same_with_direct_send_on_or_off(
    nursery: trio.Nursery, pg_dsn: str, mock_url: str, direct: bool,
) -> None:
    harness, done = await start_gateway(
        nursery, gateway_settings(pg_dsn, direct_send=direct), mock_url)
    try:
        await harness.add_key()
        user_id, key = await harness.add_user()
        client = harness.client(key)

        def consume() -> list[Any]:
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=CHAT, stream=True,
                stream_options={"include_usage": True})
            return list(stream)

        for _ in range(2):  # the second on a kept-alive connection
            chunks = await in_thread(consume)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "tok " * 20
            assert chunks[-1].usage is not None
            assert chunks[-1].usage.completion_tokens == 20
        rows = await harness.wait_for_usage(user_id, 2)
        assert [r["completion_tokens"] for r in rows] == [20, 20]
    finally:
        harness.close_clients()
        harness.stop.set()
        with trio.fail_after(20):
            await done.wait()
