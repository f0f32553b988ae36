"""KeyActor limits on the mock clock: rpm and tpm buckets, max_concurrency."""

from __future__ import annotations

import httpx
import trio
from trio.testing import MockClock

from tests.unit.workers.helpers import (
    FakeUpstream,
    answer,
    collect,
    completion_json,
    failed,
    json_response,
    make_job,
    make_key,
    run_job,
    running_actor,
    started,
)
from workers.failure import FailureClass
from workers.job import Event, Started
from workers.keyactor import KeyActor


async def test_rpm_two_at_once_then_the_third_runs_exactly_at_the_refill(
    autojump_clock: MockClock,
) -> None:
    upstream = FakeUpstream(answer())
    done_at: list[float] = []
    two_done = trio.Event()

    async def client(receive: trio.MemoryReceiveChannel[Event]) -> None:
        assert started(await collect(receive)).status == 200
        done_at.append(trio.current_time())
        if len(done_at) == 2:
            two_done.set()

    async with running_actor(make_key(rpm=2, max_concurrency=3), upstream) as actor:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                job, receive = make_job()
                assert actor.submit_nowait(job)
                nursery.start_soon(client, receive)
            await two_done.wait()
            assert trio.current_time() == 0.0
            assert actor.rpm is not None
            assert actor.rpm.level(0.0) == 0.0
            assert not actor.can_take(0.0, 0)
            assert actor.retry_after(0.0) == 30.0  # 60 s / rpm for one request
        assert trio.current_time() == 30.0
    assert done_at == [0.0, 0.0, 30.0]
    assert upstream.times == [0.0, 0.0, 30.0]


async def test_rpm_job_that_cannot_be_admitted_before_its_deadline_is_refused_at_once(
    autojump_clock: MockClock,
) -> None:
    upstream = FakeUpstream(answer())
    async with running_actor(make_key(rpm=1), upstream) as actor:
        started(await run_job(actor, *make_job()))
        job, receive = make_job(deadline=59.0)
        refusal = failed(await run_job(actor, job, receive))
        assert trio.current_time() == 0.0
        assert refusal.failure.kind is FailureClass.RATE_LIMITED
        assert refusal.failure.failover
        assert not refusal.failure.affects_health
        assert refusal.failure.retry_after_s == 60.0
        # A deadline that the refill can meet waits for exactly the refill.
        job, receive = make_job(deadline=60.0)
        started(await run_job(actor, job, receive))
        assert trio.current_time() == 60.0
        assert actor.health.state(60.0).value == "healthy"  # refusals are not failures
    assert upstream.times == [0.0, 60.0]


def _tpm_level(actor: KeyActor) -> float:
    assert actor.tpm is not None
    return actor.tpm.level(trio.current_time())


async def test_tpm_reserves_prompt_plus_max_output_and_gives_back_the_unused_part(
    autojump_clock: MockClock,
) -> None:
    levels_during: list[float] = []
    holder: list[KeyActor] = []

    async def respond(request: httpx.Request) -> httpx.Response:
        levels_during.append(_tpm_level(holder[0]))
        return json_response(200, completion_json(usage=(100, 50)))

    # tpm 6000: refills 100 tokens/s, but the mock clock does not move in this test.
    async with running_actor(make_key(tpm=6000), FakeUpstream(respond)) as actor:
        holder.append(actor)
        started(await run_job(actor, *make_job(prompt_estimate=100, max_output=400)))
        assert levels_during == [6000 - 500]
        assert _tpm_level(actor) == 6000 - 150  # settled with the upstream's usage
        assert trio.current_time() == 0.0


async def test_tpm_usage_above_the_reservation_is_taken_as_debt(
    autojump_clock: MockClock,
) -> None:
    upstream = FakeUpstream(answer(body=completion_json(usage=(300, 600))))
    async with running_actor(make_key(tpm=6000), upstream) as actor:
        started(await run_job(actor, *make_job(prompt_estimate=100, max_output=400)))
        assert _tpm_level(actor) == 6000 - 900
        assert trio.current_time() == 0.0


async def test_tpm_without_upstream_usage_settles_on_the_estimates(
    autojump_clock: MockClock,
) -> None:
    # No usage in the body: the prompt estimate plus the completion counted from the text
    # (40 ASCII characters, 10 tokens) is what the key is charged.
    upstream = FakeUpstream(answer(body=completion_json(text="x" * 40, usage=None)))
    async with running_actor(make_key(tpm=6000), upstream) as actor:
        started(await run_job(actor, *make_job(prompt_estimate=100, max_output=400)))
        assert _tpm_level(actor) == 6000 - 100 - 10


async def test_tpm_job_bigger_than_capacity_is_clamped_and_the_debt_delays_the_next(
    autojump_clock: MockClock,
) -> None:
    # tpm 600 refills 10 tokens/s. A 1000-token reservation would never fit: it is
    # clamped to the capacity and runs at once; its real usage (800) leaves 200 of debt.
    upstream = FakeUpstream(answer(body=completion_json(usage=(500, 300))))
    async with running_actor(make_key(tpm=600), upstream) as actor:
        assert actor.can_take(0.0, 1000)
        started(await run_job(actor, *make_job(prompt_estimate=500, max_output=500)))
        assert trio.current_time() == 0.0
        assert _tpm_level(actor) == -200.0
        assert not actor.can_take(0.0, 100)
        # The next job reserves 100: it waits until the level is back at 100, i.e. 30 s.
        started(await run_job(actor, *make_job(prompt_estimate=50, max_output=50)))
        assert trio.current_time() == 30.0
    assert upstream.times == [0.0, 30.0]


async def test_max_concurrency_bounds_requests_in_flight(autojump_clock: MockClock) -> None:
    upstream = FakeUpstream(answer(after_s=10.0))
    results: list[list[Event]] = []

    async def client(receive: trio.MemoryReceiveChannel[Event]) -> None:
        results.append(await collect(receive))

    async with running_actor(make_key(max_concurrency=2), upstream) as actor:
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                job, receive = make_job()
                assert actor.submit_nowait(job)
                nursery.start_soon(client, receive)
            await trio.sleep(5.0)
            assert actor.inflight == 2
            assert actor.queued == 3
            assert not actor.can_take(trio.current_time(), 0)
        assert trio.current_time() == 30.0
        assert actor.inflight == 0
        assert actor.can_take(30.0, 0)
    assert upstream.max_inflight == 2
    assert upstream.times == [0.0, 0.0, 10.0, 10.0, 20.0]
    assert all(isinstance(r[0], Started) and r[0].status == 200 for r in results)
    assert len(results) == 5


async def test_a_burst_handed_to_idle_workers_does_not_fill_the_inbox(
    autojump_clock: MockClock,
) -> None:
    """Jobs submitted in one scheduler pass go straight to idle workers: they count as
    queued (for max_concurrency) until the workers run, but take no inbox room."""
    upstream = FakeUpstream(answer(after_s=1.0))
    async with running_actor(make_key(max_concurrency=50), upstream, inbox_size=4) as actor:
        receives = []
        for _ in range(10):  # no checkpoint in between: no worker has run yet
            job, receive = make_job()
            assert actor.submit_nowait(job)
            receives.append(receive)
        assert actor.queued == 10
        assert actor.has_room()
        assert actor.can_take(trio.current_time(), 0)
        results = [await collect(receive) for receive in receives]
    assert all(isinstance(r[0], Started) for r in results)
    assert upstream.max_inflight == 10
