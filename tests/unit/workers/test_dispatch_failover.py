"""Dispatcher.open: failover across keys and the error the client gets when all fail."""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import cast

import httpx
import orjson
import pytest
import trio
from trio.testing import MockClock

from observability.metrics import Metrics
from store.apikeys import ApiKeyOwner
from store.db import Database
from store.upstream_keys import UpstreamKey
from store.usage import UsageRecord
from tests.unit.workers.helpers import (
    MODEL,
    DisableLog,
    FakeUpstream,
    completion_json,
    error_json,
    json_response,
    make_key,
    running_pool,
)
from workers.accounts import Account, Accounts
from workers.catalog import Catalog
from workers.dispatch import Dispatcher, Request
from workers.errors import (
    NoCapacity,
    RateLimited,
    Unavailable,
    UpstreamError,
    UpstreamTimeout,
)
from workers.health import HealthState
from workers.pool import KeyPool

Answer = Callable[[], httpx.Response]
BUDGET = 1_000_000  # the account's token budget: never reached here


def by_host(answers: Mapping[str, Answer], *, slow_s: float = 0.0) -> FakeUpstream:
    """An upstream whose answer depends on the key (each key has its own host)."""

    async def respond(request: httpx.Request) -> httpx.Response:
        if slow_s:
            await trio.sleep(slow_s)
        return answers[request.url.host.split(".")[0]]()

    return FakeUpstream(respond)


def ok() -> httpx.Response:
    return json_response(200, completion_json("from upstream"))


def server_error() -> httpx.Response:
    return json_response(500, error_json("server_error"))


def rate_limited(seconds: int) -> Answer:
    return lambda: json_response(429, error_json("requests", "rate_limit_exceeded"),
                                 {"retry-after": str(seconds)})


def request() -> Request:
    account = Account(user_id="u1", status="active", plan=None, token_limit=1_000_000,
                      token_used=0, expires_at=None, allowed_groups=None, rpm=None)
    return Request(
        request_id="req-1", endpoint="chat", upstream_path="/chat/completions",
        body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        raw_body=b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}'
        % MODEL.encode(),
        model=MODEL, stream=False, include_usage=False, prompt_estimate=10, max_output=20,
        owner=ApiKeyOwner(api_key_id="ak1", user_id="u1"), account=account,
    )


@asynccontextmanager
async def dispatching(
    keys: list[UpstreamKey], upstream: FakeUpstream, *, first_byte_timeout_s: float = 30.0,
    on_disable: DisableLog | None = None,
) -> AsyncIterator[tuple[Dispatcher, KeyPool]]:
    async with running_pool(upstream, first_byte_timeout_s=first_byte_timeout_s,
                            on_disable=on_disable) as pool:
        await pool.apply(keys)
        send, receive = trio.open_memory_channel[UsageRecord](16)
        # open() reads neither the accounts nor the catalogue; they never reach a database.
        accounts = Accounts(cast(Database, None), "test-holder")
        dispatcher = Dispatcher(pool, accounts, Catalog(), send, Metrics(),
                                max_attempts=3, dispatch_wait_s=5.0)
        async with send, receive:
            yield dispatcher, pool


async def test_failover_from_a_500_to_a_healthy_key(autojump_clock: MockClock) -> None:
    upstream = by_host({"first": server_error, "second": ok})
    keys = [make_key("first", priority=1), make_key("second", priority=0)]
    async with dispatching(keys, upstream) as (dispatcher, pool):
        reply = await dispatcher.open(request(), token_budget=BUDGET)
        assert reply.started.status == 200
        assert reply.started.upstream_key_id == "second"
        assert reply.job.upstream_key_id == "second"
        body = b"".join([chunk async for chunk in reply.chunks()])
        assert orjson.loads(body)["choices"][0]["message"]["content"] == "from upstream"
        assert pool.actors["first"].health.state(0.0) is HealthState.COOLING
        assert pool.actors["second"].health.state(0.0) is HealthState.HEALTHY
    assert upstream.hosts == ["first.upstream.test", "second.upstream.test"]


async def test_a_401_disables_the_key_and_fails_over(autojump_clock: MockClock) -> None:
    disabled = DisableLog()
    upstream = by_host({"bad": lambda: json_response(401, error_json("invalid_request_error",
                                                                     "invalid_api_key")),
                        "good": ok})
    keys = [make_key("bad", priority=1), make_key("good")]
    async with dispatching(keys, upstream, on_disable=disabled) as (dispatcher, _):
        reply = await dispatcher.open(request(), token_budget=BUDGET)
        assert reply.started.upstream_key_id == "good"
        await disabled.called.wait()
        assert disabled.calls == [("bad", "auto-disabled: credential")]
        # The next request goes straight to the good key.
        reply = await dispatcher.open(request(), token_budget=BUDGET)
        assert reply.started.upstream_key_id == "good"
    assert upstream.hosts == ["bad.upstream.test", "good.upstream.test", "good.upstream.test"]


async def test_a_caller_fault_is_answered_without_failover(autojump_clock: MockClock) -> None:
    bad_request = error_json("invalid_request_error", "context_length_exceeded")
    upstream = by_host({"first": lambda: json_response(400, bad_request), "second": ok})
    keys = [make_key("first", priority=1), make_key("second")]
    async with dispatching(keys, upstream) as (dispatcher, _):
        reply = await dispatcher.open(request(), token_budget=BUDGET)
        assert reply.started.status == 400
        assert reply.started.upstream_key_id == "first"
        assert await reply.next_chunk() == orjson.dumps(bad_request)
        assert await reply.next_chunk() is None
    assert upstream.hosts == ["first.upstream.test"]


async def test_all_keys_failing_is_a_502(autojump_clock: MockClock) -> None:
    upstream = by_host({"first": server_error, "second": server_error})
    keys = [make_key("first", priority=1), make_key("second")]
    async with dispatching(keys, upstream) as (dispatcher, _):
        with pytest.raises(UpstreamError) as caught:
            await dispatcher.open(request(), token_budget=BUDGET)
        assert type(caught.value) is UpstreamError
        assert caught.value.status == 502
        assert caught.value.retry_after_s == 1.0
        assert "upstream answered 500" in caught.value.message
    assert upstream.hosts == ["first.upstream.test", "second.upstream.test"]


async def test_all_keys_timing_out_is_a_504_after_each_first_byte_timeout(
    autojump_clock: MockClock,
) -> None:
    upstream = by_host({"first": ok, "second": ok}, slow_s=1000.0)
    keys = [make_key("first", priority=1), make_key("second")]
    async with dispatching(keys, upstream, first_byte_timeout_s=10.0) as (dispatcher, _):
        with pytest.raises(UpstreamTimeout) as caught:
            await dispatcher.open(request(), token_budget=BUDGET)
        assert trio.current_time() == 20.0
        assert caught.value.status == 504
        assert caught.value.retry_after_s == 1.0
    assert upstream.times == [0.0, 10.0]


async def test_all_keys_rate_limited_is_a_429_with_the_upstream_retry_after(
    autojump_clock: MockClock,
) -> None:
    upstream = by_host({"first": rate_limited(7), "second": rate_limited(4)})
    keys = [make_key("first", priority=1), make_key("second")]
    async with dispatching(keys, upstream) as (dispatcher, _):
        with pytest.raises(RateLimited) as caught:
            await dispatcher.open(request(), token_budget=BUDGET)
        assert type(caught.value) is RateLimited
        assert caught.value.status == 429
        assert caught.value.retry_after_s == 4.0  # the last answer's Retry-After
        # Two seconds later both keys are still cooling: nobody can take the request, and
        # the client learns when the first one comes back (the second key, at 4 s).
        await trio.sleep_until(2.0)
        with pytest.raises(NoCapacity) as no_capacity:
            await dispatcher.open(request(), token_budget=BUDGET)
        assert no_capacity.value.status == 503
        assert no_capacity.value.retry_after_s == 2.0
        await trio.sleep_until(4.0)
        upstream.respond = by_host({"first": ok, "second": ok}).respond
        reply = await dispatcher.open(request(), token_budget=BUDGET)
        assert reply.started.upstream_key_id == "second"
    assert upstream.times == [0.0, 0.0, 4.0]


async def test_no_usable_key_is_a_503(autojump_clock: MockClock) -> None:
    upstream = by_host({"off": ok})
    async with dispatching([make_key("off", status="disabled")], upstream) as (dispatcher, _):
        with pytest.raises(NoCapacity) as caught:
            await dispatcher.open(request(), token_budget=BUDGET)
        assert caught.value.status == 503
        assert caught.value.retry_after_s == 1.0
    assert upstream.seen == []


async def test_attempts_are_bounded(autojump_clock: MockClock) -> None:
    upstream = by_host({name: server_error for name in ("k1", "k2", "k3", "k4")})
    keys = [make_key(name, priority=-i) for i, name in enumerate(("k1", "k2", "k3", "k4"))]
    async with dispatching(keys, upstream) as (dispatcher, _):
        with pytest.raises(UpstreamError):
            await dispatcher.open(request(), token_budget=BUDGET)
    assert upstream.hosts == ["k1.upstream.test", "k2.upstream.test", "k3.upstream.test"]


def _connect_error(cause: OSError) -> Answer:
    def fail() -> httpx.Response:
        raise httpx.ConnectError(str(cause)) from cause

    return fail


async def test_the_gateway_out_of_files_is_a_503_that_blames_no_key(
    autojump_clock: MockClock,
) -> None:
    """EMFILE on connect is this process's limit, not the upstream's: no failover (the
    next key would fail the same way), no cool-down, 503 with retry-after."""
    emfile = OSError(errno.EMFILE, "Too many open files")
    upstream = by_host({"first": _connect_error(emfile), "second": ok})
    keys = [make_key("first", priority=1), make_key("second")]
    async with dispatching(keys, upstream) as (dispatcher, pool):
        with pytest.raises(Unavailable) as caught:
            await dispatcher.open(request(), token_budget=BUDGET)
        assert caught.value.status == 503
        assert caught.value.retry_after_s == 1.0
        assert "out of connections" in caught.value.message
        assert pool.actors["first"].health.state(trio.current_time()) is HealthState.HEALTHY
    assert upstream.hosts == ["first.upstream.test"]


async def test_a_refused_connection_still_fails_over_and_cools_the_key(
    autojump_clock: MockClock,
) -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    upstream = by_host({"first": _connect_error(refused), "second": ok})
    keys = [make_key("first", priority=1), make_key("second")]
    async with dispatching(keys, upstream) as (dispatcher, pool):
        reply = await dispatcher.open(request(), token_budget=BUDGET)
        assert reply.started.upstream_key_id == "second"
        assert pool.actors["first"].health.state(trio.current_time()) is HealthState.COOLING
