"""With ``serve --workers N`` each process's key actor owns its share of the key's rpm,
tpm and concurrency (``workers.keyactor``), and the shares add up to the key's limits."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from observability.metrics import Metrics
from tests.unit.workers.helpers import DisableLog, FakeUpstream, make_client, make_key
from workers.keyactor import KeyActor, _share


@given(limit=st.integers(0, 10_000), count=st.integers(1, 16))
def test_the_shares_add_up_to_the_limit_and_differ_by_one_at_most(
    limit: int, count: int,
) -> None:
    shares = [_share(limit, (index, count)) for index in range(count)]
    assert sum(s or 0 for s in shares) == limit
    assert max(s or 0 for s in shares) - min(s or 0 for s in shares) <= 1
    assert _share(None, (0, count)) is None  # unlimited stays unlimited


def _never(request: object) -> object:
    raise AssertionError("no request is sent here")


async def test_each_workers_actor_takes_its_share_of_every_limit() -> None:
    """The limits each actor then enforces (the router and keyactor tests cover that)."""
    key = make_key(rpm=5, tpm=1_001, max_concurrency=3)
    client = make_client(FakeUpstream(_never))  # type: ignore[arg-type]
    try:
        actors = [KeyActor(key, client, Metrics(), inbox_size=4, first_byte_timeout_s=1.0,
                           idle_timeout_s=1.0, on_disable=DisableLog(), share=(index, 2))
                  for index in range(2)]
        assert [a.concurrency for a in actors] == [2, 1]
        assert [a.rpm.capacity for a in actors if a.rpm] == [3, 2]
        assert [a.tpm.capacity for a in actors if a.tpm] == [501, 500]
        assert all(a.usable for a in actors)
        # A limit smaller than the workers leaves some without the key.
        third = KeyActor(make_key(max_concurrency=2), client, Metrics(), inbox_size=4,
                         first_byte_timeout_s=1.0, idle_timeout_s=1.0,
                         on_disable=DisableLog(), share=(2, 3))
        assert third.concurrency == 0
        assert not third.usable
    finally:
        await client.aclose()
