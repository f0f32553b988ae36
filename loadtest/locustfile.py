"""Locust scenarios against a running airgate, ending with a money check.

Pick scenarios by class (``locust -f loadtest/locustfile.py ChatUser``) or by tag
(``--tags stream chat embeddings account quota``):

- ``StreamingChatUser`` (tag ``stream``): streamed chat asking for the usage chunk;
- ``ChatUser`` (``chat``): non-streamed chat;
- ``EmbeddingsUser`` (``embeddings``);
- ``AccountApiUser`` (``account``): register, log in, usage stats, orders, a wxpay order
  created and cancelled;
- ``QuotaExhaustionUser`` (``quota``): a fresh user with a tiny token quota hammering
  until ``429 insufficient_quota``, which counts as expected, not as a failure.

Configuration (environment): ``AIRGATE_URL`` (or ``--host``), ``AIRGATE_KEY`` (an sk- key),
``AIRGATE_EMAIL`` / ``AIRGATE_PASSWORD`` (its owner, to read the bill; default: the demo
user), ``AIRGATE_ADMIN_EMAIL`` / ``AIRGATE_ADMIN_PASSWORD`` (optional: gives the quota
users a small coupon instead of none), ``AIRGATE_MODEL`` (default ``gpt-4o-mini``).

The money check (at quit): for every user whose key locust used, the ``usage.total_tokens``
it saw in responses must equal the tokens billed, read back through ``GET
/api/usage/stats`` (``tokenUsed`` now minus at the start). Both are printed; a mismatch
sets locust's exit code to 1. Run with ``--stop-timeout`` so no request is cut off at
the end (a cut-off stream is billed for what was relayed, which locust never saw).

Talks to airgate only over HTTP; must not import ``proxy``, ``workers`` or ``store``.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import requests
from locust import HttpUser, between, events, tag, task

MODEL = os.environ.get("AIRGATE_MODEL", "gpt-4o-mini")
EMBEDDING_MODEL = os.environ.get("AIRGATE_EMBEDDING_MODEL", "text-embedding-3-small")
DEMO_EMAIL, DEMO_PASSWORD = "demo@airgate.local", "demo-password"
QUOTA_TOKENS = 300


@dataclass
class Account:
    """One airgate user whose key locust uses: what locust saw and what it was billed."""

    label: str
    jwt: str
    used_at_start: int
    seen_tokens: int = 0
    requests: int = 0
    in_flight: int = 0


class Ledger:
    """Tokens seen per account, shared by all users of this locust process.

    Locust builds the users itself, so the state they share lives in one module-level
    object (the usual locust idiom); a lock because the web UI thread may read it.
    """

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.lock = threading.Lock()
        self.base = ""

    def add(self, key: str, account: Account) -> None:
        with self.lock:
            self.accounts.setdefault(key, account)

    def saw(self, key: str, tokens: int) -> None:
        with self.lock:
            account = self.accounts.get(key)
            if account is not None:
                account.seen_tokens += tokens
                account.requests += 1


LEDGER = Ledger()


def _post(base: str, path: str, body: dict[str, Any], token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = requests.post(base + path, json=body, headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()


def _token_used(base: str, jwt: str) -> int:
    response = requests.get(base + "/api/usage/stats", timeout=30,
                            headers={"Authorization": f"Bearer {jwt}"})
    response.raise_for_status()
    used: int = response.json()["tokenUsed"]
    return used


def _base(host: str | None) -> str:
    return (os.environ.get("AIRGATE_URL") or host or "http://127.0.0.1:8080").rstrip("/")


def _open_ledger(environment: Any, **_: Any) -> None:
    base = LEDGER.base = _base(environment.host)
    key = os.environ.get("AIRGATE_KEY")
    if not key:
        return
    email = os.environ.get("AIRGATE_EMAIL", DEMO_EMAIL)
    password = os.environ.get("AIRGATE_PASSWORD", DEMO_PASSWORD)
    jwt = _post(base, "/api/auth/login", {"email": email, "password": password})["token"]
    LEDGER.add(key, Account(email, jwt, _token_used(base, jwt)))


def _money_check(environment: Any, **_: Any) -> None:
    time.sleep(2)  # (gevent-patched) usage is charged in memory at once; flush anyway
    ok = True
    print("\nmoney check: tokens locust saw in responses vs tokens billed (GET /api/usage/stats)")
    with LEDGER.lock:
        accounts = list(LEDGER.accounts.values())
    for account in accounts:
        billed = _token_used(LEDGER.base, account.jwt) - account.used_at_start
        match = billed == account.seen_tokens
        ok = ok and match
        note = f" ({account.in_flight} requests cut off)" if account.in_flight else ""
        print(f"  {account.label:<40} requests {account.requests:>7}"
              f"  seen {account.seen_tokens:>10}  billed {billed:>10}"
              f"  {'OK' if match else 'MISMATCH'}{note}")
    if not accounts:
        print("  no tracked key (set AIRGATE_KEY)")
    print(f"money check: {'PASSED' if ok else 'FAILED'}\n")
    if not ok:
        environment.process_exit_code = 1


# locust's add_listener is unannotated; registering through Any keeps mypy --strict happy.
_EVENTS: Any = events
_EVENTS.test_start.add_listener(_open_ledger)
_EVENTS.quitting.add_listener(_money_check)


class _KeyUser(HttpUser):
    """A user calling /v1 with the configured sk- key."""

    abstract = True
    wait_time = between(0.01, 0.1)
    api_key = ""

    def on_start(self) -> None:
        self.api_key = os.environ.get("AIRGATE_KEY", "")
        if not self.api_key:
            raise RuntimeError("set AIRGATE_KEY to an sk- key")

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def _track(self, delta: int) -> None:
        with LEDGER.lock:
            account = LEDGER.accounts.get(self.api_key)
            if account is not None:
                account.in_flight += delta

    def chat(self, name: str, body: dict[str, Any], *, quota_ok: bool = False) -> None:
        self._track(1)
        with self.client.post("/v1/chat/completions", json=body, headers=self._headers(),
                              name=name, catch_response=True) as response:
            if response.status_code == 200:
                LEDGER.saw(self.api_key, response.json()["usage"]["total_tokens"])
                response.success()
            elif quota_ok and response.status_code == 429 and _code(response) == (
                "insufficient_quota"
            ):
                response.success()
            else:
                response.failure(f"{response.status_code}: {response.text[:200]}")
        self._track(-1)


def _code(response: Any) -> str | None:
    try:
        code: str | None = response.json()["error"]["code"]
        return code
    except (ValueError, KeyError, TypeError):
        return None


def _prompt() -> list[dict[str, str]]:
    return [{"role": "user", "content": "Tell me a short story about load testing"}]


class StreamingChatUser(_KeyUser):
    weight = 3

    @tag("stream")
    @task
    def stream(self) -> None:
        body = {"model": MODEL, "messages": _prompt(), "stream": True,
                "stream_options": {"include_usage": True}}
        self._track(1)
        with self.client.post("/v1/chat/completions", json=body, headers=self._headers(),
                              name="/v1/chat/completions [stream]", stream=True,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            else:
                usage, done = None, False
                for line in response.iter_lines():
                    if not line.startswith(b"data: "):
                        continue
                    if line == b"data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        usage = event["usage"]
                if usage is not None:
                    LEDGER.saw(self.api_key, usage["total_tokens"])
                if done and usage is not None:
                    response.success()
                else:
                    response.failure("stream ended without usage chunk or [DONE]")
        self._track(-1)


class ChatUser(_KeyUser):
    weight = 3

    @tag("chat")
    @task
    def chat_once(self) -> None:
        self.chat("/v1/chat/completions", {"model": MODEL, "messages": _prompt()})


class EmbeddingsUser(_KeyUser):
    weight = 1

    @tag("embeddings")
    @task
    def embed(self) -> None:
        body = {"model": EMBEDDING_MODEL, "input": ["load testing is fun", "and useful"]}
        self._track(1)
        with self.client.post("/v1/embeddings", json=body, headers=self._headers(),
                              catch_response=True) as response:
            if response.status_code == 200:
                LEDGER.saw(self.api_key, response.json()["usage"]["total_tokens"])
                response.success()
            else:
                response.failure(f"{response.status_code}: {response.text[:200]}")
        self._track(-1)


def _register(client: Any, prefix: str) -> tuple[str, str, str]:
    """Register a fresh user through locust's client; (email, password, jwt)."""
    email = f"{prefix}-{secrets.token_hex(6)}@loadtest.airgate.local"
    password = secrets.token_hex(10)
    response = client.post("/api/auth/register", json={"email": email, "password": password},
                           name="/api/auth/register")
    response.raise_for_status()
    return email, password, response.json()["token"]


class AccountApiUser(HttpUser):
    """The account API mix a web console would produce."""

    weight = 1
    wait_time = between(0.1, 0.5)
    email = password = jwt = ""

    def on_start(self) -> None:
        self.email, self.password, self.jwt = _register(self.client, "acct")

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.jwt}"}

    @tag("account")
    @task(2)
    def login(self) -> None:
        response = self.client.post("/api/auth/login", name="/api/auth/login",
                                    json={"email": self.email, "password": self.password})
        if response.ok:
            self.jwt = response.json()["token"]

    @tag("account")
    @task(5)
    def usage_stats(self) -> None:
        self.client.get("/api/usage/stats", headers=self._auth())

    @tag("account")
    @task(3)
    def orders(self) -> None:
        self.client.get("/api/orders", headers=self._auth())

    @tag("account")
    @task(1)
    def order_and_cancel(self) -> None:
        plans = self.client.get("/api/plans").json().get("plans") or []
        if not plans:
            return
        response = self.client.post(
            "/api/orders/create", headers=self._auth(), name="/api/orders/create [wxpay]",
            json={"planId": plans[0]["id"], "paymentMethod": "wxpay"},
        )
        if response.ok:
            order_id = response.json()["orderId"]
            self.client.post(f"/api/orders/{order_id}/cancel", headers=self._auth(),
                             name="/api/orders/[id]/cancel")


class QuotaExhaustionUser(_KeyUser):
    """A fresh user with a tiny quota (a coupon if admin credentials are given, else none)."""

    weight = 1
    wait_time = between(0.01, 0.05)

    def on_start(self) -> None:
        email, _, jwt = _register(self.client, "quota")
        admin_email = os.environ.get("AIRGATE_ADMIN_EMAIL")
        if admin_email:
            base = LEDGER.base or _base(self.host)
            admin = _post(base, "/api/admin/login", {
                "email": admin_email, "password": os.environ.get("AIRGATE_ADMIN_PASSWORD", "")})
            code = f"LT{secrets.token_hex(6).upper()}"
            _post(base, "/api/admin/coupons", {"code": code, "kind": "tokens",
                                               "value": QUOTA_TOKENS, "maxUses": 1},
                  admin["token"])
            _post(base, "/api/coupon/redeem", {"code": code}, jwt)
        response = self.client.post("/api/auth/apikey", json={"name": "quota"}, name=
                                    "/api/auth/apikey", headers={"Authorization": f"Bearer {jwt}"})
        response.raise_for_status()
        self.api_key = response.json()["api_key"]
        LEDGER.add(self.api_key, Account(email, jwt, 0))

    @tag("quota")
    @task
    def hammer(self) -> None:
        self.chat("/v1/chat/completions [quota, 429 expected]",
                  {"model": MODEL, "messages": _prompt()}, quota_ok=True)
