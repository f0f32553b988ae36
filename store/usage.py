"""Usage records and their batched, idempotent write.

Owns the ``usage_records`` table and the user counters it feeds. A batch is written in one
statement: rows whose ``request_id`` already exists are skipped (a retried flush never
double-bills) and only the rows actually inserted are added to the users' counters.
Imports only ``store.db``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from store.db import Database


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    user_id: str
    api_key_id: str | None
    upstream_key_id: str | None
    model: str
    endpoint: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micro: int
    latency_ms: int
    ttft_ms: int | None
    status: int
    usage_source: str  # upstream | estimate | none
    created_at: datetime | None = None  # when the request started; None: when written

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


_WRITE = """
WITH ins AS (
    INSERT INTO usage_records (
        request_id, user_id, api_key_id, upstream_key_id, model, endpoint,
        prompt_tokens, cached_tokens, completion_tokens, cost_micro,
        latency_ms, ttft_ms, status, usage_source, created_at)
    SELECT r.request_id, r.user_id, r.api_key_id, r.upstream_key_id, r.model, r.endpoint,
           r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.cost_micro,
           r.latency_ms, r.ttft_ms, r.status, r.usage_source, coalesce(r.created_at, now())
      FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
        $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[],
        $11::int[], $12::int[], $13::int[], $14::text[], $16::timestamptz[])
        AS r(request_id, user_id, api_key_id, upstream_key_id, model, endpoint,
             prompt_tokens, cached_tokens, completion_tokens, cost_micro,
             latency_ms, ttft_ms, status, usage_source, created_at)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING user_id, api_key_id, prompt_tokens + completion_tokens AS tokens
), per_user AS (
    UPDATE users u
       SET token_used = u.token_used + s.tokens, request_count = u.request_count + s.n
      FROM (SELECT user_id, sum(tokens) AS tokens, count(*) AS n FROM ins GROUP BY user_id) s
     WHERE u.id = s.user_id
), per_lease AS (
    UPDATE quota_leases q SET tokens = greatest(q.tokens - s.tokens, 0)
      FROM (SELECT user_id, sum(tokens) AS tokens FROM ins GROUP BY user_id) s
     WHERE q.user_id = s.user_id AND q.holder = $15
), per_key AS (
    UPDATE api_keys k SET last_used_at = now()
     WHERE k.id IN (SELECT DISTINCT api_key_id FROM ins WHERE api_key_id IS NOT NULL)
)
SELECT count(*) FROM ins
"""


async def write_usage(
    db: Database, records: Sequence[UsageRecord], holder: str = ""
) -> int:
    """Insert ``records`` and charge their users; return how many were new.

    The tokens move out of ``holder`` 's quota leases (``store.quota``) into ``token_used``.
    """
    if not records:
        return 0
    columns: list[list[object]] = [[] for _ in range(15)]
    for r in records:
        row = (
            r.request_id, r.user_id, r.api_key_id, r.upstream_key_id, r.model, r.endpoint,
            r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.cost_micro,
            r.latency_ms, r.ttft_ms, r.status, r.usage_source, r.created_at,
        )
        for col, value in zip(columns, row, strict=True):
            col.append(value)
    inserted = await db.fetchval(_WRITE, *columns[:14], holder, columns[14])
    return int(inserted)
