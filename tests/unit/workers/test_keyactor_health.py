"""KeyActor health on the mock clock: cooling, Retry-After, the circuit, auto-disable."""

from __future__ import annotations

import math

import httpx
import orjson
import trio
from trio.testing import MockClock

from observability.metrics import Metrics
from tests.unit.workers.helpers import (
    DisableLog,
    FakeUpstream,
    answer,
    body_of,
    collect,
    completion_json,
    error_json,
    failed,
    failures,
    json_response,
    make_job,
    make_key,
    run_job,
    running_actor,
    started,
)
from workers.failure import FailureClass
from workers.health import HealthState
from workers.job import Event, Started
from workers.keyactor import KeyActor

SERVER_ERROR = error_json("server_error")


async def open_the_circuit(actor: KeyActor) -> None:
    """Five failed requests, each as soon as the key's cool-down allows (0, 1, 3, 7 and
    15 s): the circuit opens, half-open at 45 s. The upstream must answer them with
    failures."""
    for _ in range(5):
        at = actor.health.available_at(trio.current_time())
        assert at is not None
        await trio.sleep_until(at)
        failed(await run_job(actor, *make_job()))


async def test_5xx_fails_over_and_cools_the_key_for_exactly_the_base_cooldown(
    autojump_clock: MockClock,
) -> None:
    metrics = Metrics()
    upstream = FakeUpstream(answer(500, SERVER_ERROR))
    async with running_actor(make_key(), upstream, metrics=metrics) as actor:
        failure = failed(await run_job(actor, *make_job())).failure
        assert failure.kind is FailureClass.TRANSIENT
        assert failure.failover
        assert failure.status == 500
        assert failures(metrics, "transient") == 1
        # The reply closes only after the verdict was recorded.
        assert actor.health.state(0.0) is HealthState.COOLING
        assert not actor.can_take(0.0, 0)
        assert actor.retry_after(0.0) == 1.0
        assert not actor.health.available(math.nextafter(1.0, 0.0))
        # A job while cooling is refused without calling the upstream, and that refusal
        # does not lengthen the cool-down.
        refusal = failed(await run_job(actor, *make_job())).failure
        assert refusal.kind is FailureClass.TRANSIENT
        assert refusal.failover
        assert not refusal.affects_health
        assert refusal.retry_after_s == 1.0
        assert len(upstream.seen) == 1
        await trio.sleep_until(1.0)
        assert actor.can_take(1.0, 0)
        upstream.respond = answer()
        assert started(await run_job(actor, *make_job())).status == 200
        assert actor.health.state(1.0) is HealthState.HEALTHY
        assert actor.health.consecutive_failures == 0
    assert upstream.times == [0.0, 1.0]


async def test_429_retry_after_makes_the_key_unavailable_for_exactly_that_long(
    autojump_clock: MockClock,
) -> None:
    metrics = Metrics()
    upstream = FakeUpstream(answer(429, error_json("requests", "rate_limit_exceeded"),
                                   {"retry-after": "7"}))
    async with running_actor(make_key(), upstream, metrics=metrics) as actor:
        failure = failed(await run_job(actor, *make_job())).failure
        assert failure.kind is FailureClass.RATE_LIMITED
        assert failure.failover
        assert failure.retry_after_s == 7.0
        assert failures(metrics, "rate_limited") == 1
        assert actor.health.state(0.0) is HealthState.COOLING
        assert actor.retry_after(0.0) == 7.0
        assert not actor.health.available(math.nextafter(7.0, 0.0))
        assert actor.health.available_at(0.0) == 7.0
        upstream.respond = answer()
        await trio.sleep_until(7.0)
        assert started(await run_job(actor, *make_job())).status == 200
        # Rate limits never open the circuit and never disable the key.
        assert actor.health.state(7.0) is HealthState.HEALTHY
    assert upstream.times == [0.0, 7.0]


async def test_repeated_5xx_opens_the_circuit_then_admits_a_single_half_open_probe(
    autojump_clock: MockClock,
) -> None:
    probe_entered = trio.Event()
    release_probe = trio.Event()
    calls = 0

    async def respond(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls <= 5:
            return json_response(503, SERVER_ERROR)
        probe_entered.set()
        await release_probe.wait()
        return json_response(200, completion_json())

    upstream = FakeUpstream(respond)
    async with running_actor(make_key(max_concurrency=2), upstream) as actor:
        # Cool-downs 1, 2, 4, 8 s between the failures; the fifth opens the circuit.
        for at in (0.0, 1.0, 3.0, 7.0, 15.0):
            await trio.sleep_until(at)
            assert actor.health.available(at)
            assert failed(await run_job(actor, *make_job())).failure.status == 503
        assert actor.health.state(15.0) is HealthState.OPEN
        assert actor.retry_after(15.0) == 30.0  # open_s
        await trio.sleep_until(math.nextafter(45.0, 0.0))
        assert not actor.health.available(trio.current_time())
        refused = failed(await run_job(actor, *make_job())).failure
        assert not refused.affects_health
        await trio.sleep_until(45.0)
        assert actor.health.state(45.0) is HealthState.HALF_OPEN
        # The probe goes; while it is in flight a second job is refused, not sent.
        async with trio.open_nursery() as nursery:
            probe, probe_reply = make_job()
            assert actor.submit_nowait(probe)
            probe_events: list[Event] = []

            async def read_probe() -> None:
                probe_events.extend(await collect(probe_reply))

            nursery.start_soon(read_probe)
            await probe_entered.wait()
            assert not actor.can_take(45.0, 0)
            second = failed(await run_job(actor, *make_job())).failure
            assert second.kind is FailureClass.TRANSIENT
            assert not second.affects_health
            release_probe.set()
        assert isinstance(probe_events[0], Started)
        assert actor.health.state(45.0) is HealthState.HEALTHY
        assert actor.health.consecutive_failures == 0
    assert upstream.times == [0.0, 1.0, 3.0, 7.0, 15.0, 45.0]


async def test_a_failed_half_open_probe_opens_the_circuit_again(
    autojump_clock: MockClock,
) -> None:
    upstream = FakeUpstream(answer(502, SERVER_ERROR))
    async with running_actor(make_key(), upstream) as actor:
        await open_the_circuit(actor)
        assert trio.current_time() == 15.0
        await trio.sleep_until(45.0)
        failed(await run_job(actor, *make_job()))
        assert actor.health.state(45.0) is HealthState.OPEN
        assert actor.health.available_at(45.0) == 75.0
    assert upstream.times == [0.0, 1.0, 3.0, 7.0, 15.0, 45.0]


async def test_a_half_open_probe_that_ends_in_an_unexpected_error_frees_the_probe_slot(
    autojump_clock: MockClock,
) -> None:
    """A bug (here: the transport raising what no one expects) while serving the probe
    gives no verdict on the key; the next request may probe, instead of the key staying
    unavailable for good."""
    calls = 0

    async def respond(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls <= 5:
            return json_response(502, SERVER_ERROR)
        if calls == 6:
            raise RuntimeError("a bug")
        return json_response(200, completion_json())

    upstream = FakeUpstream(respond)
    async with running_actor(make_key(), upstream) as actor:
        await open_the_circuit(actor)
        await trio.sleep_until(45.0)
        assert actor.health.state(45.0) is HealthState.HALF_OPEN
        assert await run_job(actor, *make_job()) == []  # the reply just closes
        assert actor.health.available(45.0)
        assert started(await run_job(actor, *make_job())).status == 200
        assert actor.health.state(45.0) is HealthState.HEALTHY
    assert upstream.times == [0.0, 1.0, 3.0, 7.0, 15.0, 45.0, 45.0]


async def test_401_disables_the_key_and_reports_it_once(autojump_clock: MockClock) -> None:
    disabled = DisableLog()
    upstream = FakeUpstream(answer(401, error_json("invalid_request_error",
                                                   "invalid_api_key")))
    async with running_actor(make_key("k7"), upstream, on_disable=disabled) as actor:
        failure = failed(await run_job(actor, *make_job())).failure
        assert failure.kind is FailureClass.CREDENTIAL
        assert failure.failover
        await disabled.called.wait()
        assert disabled.calls == [("k7", "auto-disabled: credential")]
        assert actor.health.state(0.0) is HealthState.DISABLED
        assert actor.retry_after(0.0) is None
        assert not actor.can_take(0.0, 0)
        # Much later the key is still out of rotation and the upstream is not called.
        await trio.sleep(3600.0)
        assert failed(await run_job(actor, *make_job())).failure.failover
        assert disabled.calls == [("k7", "auto-disabled: credential")]
    assert len(upstream.seen) == 1


async def test_quota_code_in_a_429_disables_the_key(autojump_clock: MockClock) -> None:
    disabled = DisableLog()
    upstream = FakeUpstream(answer(429, error_json("insufficient_quota", "insufficient_quota"),
                                   {"retry-after": "1"}))
    async with running_actor(make_key(), upstream, on_disable=disabled) as actor:
        assert failed(await run_job(actor, *make_job())).failure.kind is FailureClass.QUOTA
        await disabled.called.wait()
        assert disabled.calls == [("k1", "auto-disabled: quota")]
        assert actor.health.state(100.0) is HealthState.DISABLED


async def test_400_caller_fault_is_relayed_to_the_client_and_the_key_stays_healthy(
    autojump_clock: MockClock,
) -> None:
    metrics = Metrics()
    body = error_json("invalid_request_error", "context_length_exceeded", "too long")
    upstream = FakeUpstream(answer(400, body))
    async with running_actor(make_key("k2"), upstream, metrics=metrics) as actor:
        job, receive = make_job()
        events = await run_job(actor, job, receive)
        assert started(events) == Started(400, "application/json", "k2")
        assert body_of(events) == orjson.dumps(body)
        assert len(events) == 2
        assert actor.health.state(0.0) is HealthState.HEALTHY
        assert actor.can_take(0.0, 0)
        assert failures(metrics, "caller") == 1
        assert job.status == 400


async def test_no_first_byte_in_time_is_a_timeout_that_cools_the_key(
    autojump_clock: MockClock,
) -> None:
    upstream = FakeUpstream(answer(after_s=1000.0))
    async with running_actor(make_key(), upstream, first_byte_timeout_s=5.0) as actor:
        failure = failed(await run_job(actor, *make_job())).failure
        assert trio.current_time() == 5.0
        assert failure.kind is FailureClass.TIMEOUT
        assert failure.failover
        assert actor.health.state(5.0) is HealthState.COOLING
        assert actor.inflight == 0


async def test_connection_error_is_a_connect_failure(autojump_clock: MockClock) -> None:
    async def respond(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with running_actor(make_key(), FakeUpstream(respond)) as actor:
        failure = failed(await run_job(actor, *make_job())).failure
        assert failure.kind is FailureClass.CONNECT
        assert failure.failover
        assert actor.health.state(0.0) is HealthState.COOLING


async def test_request_sent_upstream_uses_the_key_url_secret_and_model_map(
    autojump_clock: MockClock,
) -> None:
    upstream = FakeUpstream(answer())
    key = make_key("k3", base_url="https://api.example.test/v1/",
                   model_map={"gpt-test": "provider-model-x"})
    async with running_actor(key, upstream) as actor:
        job, receive = make_job()
        started(await run_job(actor, job, receive))
    [seen] = upstream.seen
    assert (seen.host, seen.path) == ("api.example.test", "/v1/chat/completions")
    assert seen.authorization == "Bearer sk-upstream-k3"
    assert seen.body["model"] == "provider-model-x"
    assert "stream_options" not in seen.body
    assert job.body["model"] == "gpt-test"  # the client's body is not changed
    assert job.upstream_key_id == "k3"
