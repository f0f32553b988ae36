"""``airgate demo``: the gateway, a built-in mock upstream and a seeded demo user.

Seeds (once) an upstream key that points at the mock and a demo user on the starter
plan, then prints a fresh ``sk-`` key so a newcomer can call the gateway at once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import trio

from loadtest.mock_upstream import MockConfig, run_mock_upstream
from proxy.gateway import Gateway
from proxy.serve import serve
from proxy.settings import Settings
from store.apikeys import create_api_key
from store.plans import get_plan
from store.upstream_keys import create_upstream_key, list_upstream_keys, update_upstream_key
from store.users import create_user, get_user_by_email
from workers.passwords import hash_password

DEMO_EMAIL = "demo@airgate.local"
DEMO_PASSWORD = "demo-password"
DEMO_KEY_NAME = "demo mock upstream"


async def seed_demo(gw: Gateway, mock_url: str) -> str:
    """Make sure the demo upstream key and user exist; return a new sk- key."""
    db = gw.db
    keys = [k for k in await list_upstream_keys(db) if k.name == DEMO_KEY_NAME]
    models = sorted(gw.catalog.models)
    if keys:
        key = await update_upstream_key(db, keys[0].id, {"base_url": mock_url,
                                                           "models": models})
    else:
        key = await create_upstream_key(db, {
            "name": DEMO_KEY_NAME, "base_url": mock_url, "api_key": "mock-demo-key",
            "models": models, "max_concurrency": 1000,
        })
    assert key is not None
    await gw.pool.put(key)
    user = await get_user_by_email(db, DEMO_EMAIL)
    if user is None:
        user = await create_user(db, email=DEMO_EMAIL,
                                 password_hash=await hash_password(DEMO_PASSWORD))
        plan = await get_plan(db, "starter_monthly")
        assert plan is not None
        await db.execute(
            "UPDATE users SET plan = $2, token_limit = $3, expires_at = $4 WHERE id = $1",
            user.id, plan.id, plan.token_limit,
            datetime.now(UTC) + timedelta(days=plan.duration_days),
        )
    _, secret = await create_api_key(db, user.id, "demo")
    return secret


async def run_demo(settings: Settings, mock: MockConfig) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(run_mock_upstream, mock)
        mock_url = f"http://127.0.0.1:{port}/v1"

        async def ready(gw: Gateway, binds: list[str]) -> None:
            secret = await seed_demo(gw, mock_url)
            base = binds[0] if binds else f"http://{settings.host}:{settings.port}"
            print(f"\nairgate demo is running on {base}", flush=True)
            print(f"  mock upstream:  {mock_url}", flush=True)
            print(f"  demo user:      {DEMO_EMAIL} / {DEMO_PASSWORD}", flush=True)
            print(f"  API key:        {secret}", flush=True)
            print(f"  try: curl {base}/v1/chat/completions -H 'Authorization: Bearer {secret}'"
                  " -H 'Content-Type: application/json'"
                  " -d '{\"model\":\"deepseek-v4-flash\",\"messages\":"
                  "[{\"role\":\"user\",\"content\":\"Hello!\"}]}'\n", flush=True)

        await serve(settings, on_ready=ready)
        nursery.cancel_scope.cancel()
