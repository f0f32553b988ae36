"""Streams through the openai SDK with direct writes (AIRGATE_DIRECT_SEND) and the
upstream read pump (AIRGATE_UPSTREAM_PUMP) on and off.

Every other e2e test runs with the default (on); this one checks that a stream is
relayed and billed the same either way (tests/unit/proxy/test_direct_send.py checks which
way the bytes went).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from loadtest.mock_shapes import MockConfig
from loadtest.mock_upstream import run_mock_upstream
from loadtest.self_signed import write_pem
from tests.e2e.conftest import Harness, gateway_settings, in_thread, start_gateway
from workers import relay

CHAT = [{"role": "user", "content": "say hello to the gateway"}]


@pytest.mark.parametrize(("direct", "pump"), [(True, True), (False, True), (True, False)])
async def test_a_stream_is_relayed_and_billed_the_same_with_direct_send_on_or_off(
    nursery: trio.Nursery, pg_dsn: str, mock_url: str, direct: bool, pump: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pumped = _count_pumped(monkeypatch)
    harness, done = await start_gateway(
        nursery, gateway_settings(pg_dsn, direct_send=direct, upstream_pump=pump), mock_url)
    await _two_streams_billed(harness, done)
    # The pump read both streams when it ran and the client's socket could be written
    # directly.
    assert len(pumped) == (2 if pump and direct else 0)


async def test_an_https_upstream_is_read_by_the_pump_and_billed_the_same(
    nursery: trio.Nursery, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mock upstream behind TLS (hypercorn, a self-signed certificate the gateway
    trusts through ``SSL_CERT_FILE``, as an operator would for a private CA)."""
    cert, key = write_pem(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    port = await nursery.start(partial(run_mock_upstream, MockConfig(),
                                       tls=(str(cert), str(key))))
    pumped = _count_pumped(monkeypatch)
    harness, done = await start_gateway(
        nursery, gateway_settings(pg_dsn), f"https://localhost:{port}/v1")
    await _two_streams_billed(harness, done)
    assert len(pumped) == 2


def _count_pumped(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets an item each time a stream is read by the pump."""
    pumped: list[int] = []
    read_pumped = relay._read_pumped

    async def counting(*args: Any) -> tuple[bool, bool]:
        pumped.append(1)
        return await read_pumped(*args)

    monkeypatch.setattr(relay, "_read_pumped", counting)
    return pumped


async def _two_streams_billed(harness: Harness, done: trio.Event) -> None:
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
