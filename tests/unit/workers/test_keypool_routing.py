"""KeyPool: routing by priority tier and weight, and starting/replacing/stopping actors."""

from __future__ import annotations

import dataclasses
from collections import Counter

import trio
from trio.testing import MockClock

from tests.unit.workers.helpers import (
    FakeUpstream,
    answer,
    collect,
    make_job,
    make_key,
    run_job,
    running_pool,
    started,
)
from workers.job import Event
from workers.keyactor import KeyActor

MODEL = "gpt-test"


def _picked(actor: KeyActor | None) -> str | None:
    return None if actor is None else actor.key.id


async def test_highest_priority_tier_first_then_lower_tiers(autojump_clock: MockClock) -> None:
    async with running_pool(FakeUpstream(answer())) as pool:
        await pool.apply([make_key("low", priority=0, weight=100),
                          make_key("high", priority=10, weight=1),
                          make_key("mid", priority=5)])
        assert {_picked(pool.pick(MODEL, 10, set())) for _ in range(200)} == {"high"}
        assert {_picked(pool.pick(MODEL, 10, {"high"})) for _ in range(200)} == {"mid"}
        assert _picked(pool.pick(MODEL, 10, {"high", "mid"})) == "low"
        assert pool.pick(MODEL, 10, {"high", "mid", "low"}) is None
        assert pool.pick("other-model", 10, set()) is None


async def test_weights_share_the_picks_within_a_tier(autojump_clock: MockClock) -> None:
    async with running_pool(FakeUpstream(answer()), rng_seed=20240601) as pool:
        await pool.apply([make_key("a", weight=1), make_key("b", weight=3),
                          make_key("c", weight=6), make_key("backup", priority=-1,
                                                            weight=1000)])
        picks = Counter(_picked(pool.pick(MODEL, 10, set())) for _ in range(20_000))
        assert set(picks) == {"a", "b", "c"}
        shares = {key: count / 20_000 for key, count in picks.items()}
        assert abs(shares["a"] - 0.1) < 0.015
        assert abs(shares["b"] - 0.3) < 0.015
        assert abs(shares["c"] - 0.6) < 0.015
        # Excluding one key re-weighs the others.
        picks = Counter(_picked(pool.pick(MODEL, 10, {"c"})) for _ in range(20_000))
        assert set(picks) == {"a", "b"}
        assert abs(picks["b"] / 20_000 - 0.75) < 0.015


async def test_keys_that_cannot_take_work_now_are_skipped(autojump_clock: MockClock) -> None:
    upstream = FakeUpstream(answer())
    async with running_pool(upstream) as pool:
        await pool.apply([
            make_key("off", priority=30, status="disabled"),
            make_key("limited", priority=20, rpm=1),
            make_key("small", priority=10, tpm=100),
            make_key("plain", priority=0),
        ])
        # A disabled key is never picked, nor used as a fallback.
        assert _picked(pool.pick(MODEL, 10, set())) == "limited"
        assert _picked(pool.fallback(MODEL, {"limited", "small", "plain"})) is None
        # Once its one request per minute is spent, the rpm-limited key is skipped ...
        started(await run_job(pool.actors["limited"], *make_job()))
        assert _picked(pool.pick(MODEL, 10, set())) == "small"
        # ... and a job whose tokens the tpm bucket does not hold now skips "small" too:
        # the request used 12 tokens (the fake's usage), so 88 of 100 are left.
        started(await run_job(pool.actors["small"], *make_job()))
        assert _picked(pool.pick(MODEL, 89, set())) == "plain"
        assert _picked(pool.pick(MODEL, 88, set())) == "small"
        assert _picked(pool.pick(MODEL, 10, set())) == "small"
        # The rpm refill brings "limited" back after exactly 60 s.
        await trio.sleep_until(59.0)
        assert _picked(pool.pick(MODEL, 10, set())) == "small"
        await trio.sleep_until(60.0)
        assert _picked(pool.pick(MODEL, 10, set())) == "limited"
        # When nobody can take the job now, the fallback is a healthy key with room.
        assert _picked(pool.fallback(MODEL, set())) == "limited"


async def test_a_key_at_max_concurrency_is_skipped(autojump_clock: MockClock) -> None:
    upstream = FakeUpstream(answer(after_s=10.0))
    async with running_pool(upstream) as pool:
        await pool.apply([make_key("busy", priority=1, max_concurrency=1),
                          make_key("spare", priority=0)])
        job, receive = make_job()
        assert pool.actors["busy"].submit_nowait(job)
        assert _picked(pool.pick(MODEL, 10, set())) == "spare"
        assert started(await collect(receive)).status == 200
        assert trio.current_time() == 10.0
        assert _picked(pool.pick(MODEL, 10, set())) == "busy"


async def test_apply_starts_replaces_and_stops_actors(autojump_clock: MockClock) -> None:
    upstream = FakeUpstream(answer())
    async with running_pool(upstream) as pool:
        a, b = make_key("a"), make_key("b")
        await pool.apply([a, b])
        assert set(pool.actors) == {"a", "b"}
        first_a, first_b = pool.actors["a"], pool.actors["b"]
        for actor in (first_a, first_b):
            started(await run_job(actor, *make_job()))
        # Unchanged rows keep their actor; a changed row gets a new one.
        b2 = dataclasses.replace(b, weight=5)
        await pool.apply([a, b2])
        assert pool.actors["a"] is first_a
        assert pool.actors["b"] is not first_b
        assert pool.actors["b"].key == b2
        assert not first_b.submit_nowait(make_job()[0])  # the old actor takes no more
        started(await run_job(pool.actors["b"], *make_job()))
        # A key missing from the new set is stopped.
        await pool.apply([a])
        assert set(pool.actors) == {"a"}
        assert pool.serving(MODEL) == [first_a]
        # put/remove do the same one key at a time.
        await pool.put(make_key("c"))
        pool.remove("a")
        assert set(pool.actors) == {"c"}
        assert _picked(pool.pick(MODEL, 10, set())) == "c"
    assert upstream.hosts == ["a.upstream.test", "b.upstream.test", "b.upstream.test"]


async def test_a_removed_key_still_answers_its_queued_jobs(autojump_clock: MockClock) -> None:
    upstream = FakeUpstream(answer(after_s=5.0))
    done_at: list[float] = []

    async def client(receive: trio.MemoryReceiveChannel[Event]) -> None:
        assert started(await collect(receive)).status == 200
        done_at.append(trio.current_time())

    async with running_pool(upstream) as pool:
        await pool.apply([make_key("a"), make_key("b", max_concurrency=1)])
        old = pool.actors["b"]
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                job, receive = make_job()
                assert old.submit_nowait(job)
                nursery.start_soon(client, receive)
            await pool.apply([make_key("a")])
            assert "b" not in pool.actors
            assert not old.submit_nowait(make_job()[0])
        assert old.queued == 0
        assert old.inflight == 0
    assert done_at == [5.0, 10.0, 15.0]
    assert upstream.hosts == ["b.upstream.test"] * 3
