"""The one classifier of upstream failures.

Owns :class:`FailureClass`, :class:`Failure`, :func:`classify` and
:func:`parse_retry_after`. Every upstream failure (HTTP error, timeout, refused connection,
error event inside a stream) goes through :func:`classify`, which decides two things the
router and the key-health machine act on: whether to fail over to another key and whether
the failure counts against the key.

The decision reads the HTTP status and the OpenAI error object's ``type`` and ``code``; a
specific ``type``/``code`` wins over the status (a 429 whose code is ``insufficient_quota``
is a quota failure, not a rate limit). The human-readable ``message`` is kept for logs but
is never used to decide anything: disabling a key because its error text happens to contain
"balance" is exactly the bug this module exists to prevent.

Classification table (first matching row wins):

=====================================================  ===============  ========  ======
signal                                                 kind             failover  health
=====================================================  ===============  ========  ======
``connect_error=True``                                 CONNECT          yes       yes
``timeout=True``                                       TIMEOUT          yes       yes
type/code in :data:`QUOTA_SIGNALS`                     QUOTA            yes       yes
type/code in :data:`CREDENTIAL_SIGNALS`                CREDENTIAL       yes       yes
type/code in :data:`MODEL_NOT_FOUND_SIGNALS`           MODEL_NOT_FOUND  yes       no
type/code in :data:`CALLER_SIGNALS`                    CALLER           no        no
type/code in :data:`RATE_LIMIT_SIGNALS`                RATE_LIMITED     yes       yes
type/code in :data:`TRANSIENT_SIGNALS`                 TRANSIENT        yes       yes
status 401, 403                                        CREDENTIAL       yes       yes
status 402                                             QUOTA            yes       yes
status 429                                             RATE_LIMITED     yes       yes
status 408, 409, 425, 5xx                              TRANSIENT        yes       yes
any other 4xx (400, 404, 413, 422, ...)                CALLER           no        no
no status, 1xx-3xx (e.g. an error event in a stream)   TRANSIENT        yes       yes
=====================================================  ===============  ========  ======

Decisions worth knowing:

* A 403 is a credential failure (the key is not allowed) unless its type/code says the
  *request* was refused by policy (``content_policy_violation``, ``content_filter``,
  ...), which is a caller fault.
* MODEL_NOT_FOUND fails over (another key or upstream may serve the model) but does not
  count against the key's health: the key works, it just does not serve this model, and a
  per-key circuit cannot express per-model availability. The router should remember the
  (key, model) pair if it wants to stop trying it.
* CALLER failures are the client's doing (bad parameters, context too long, content
  policy): retrying on another key would fail the same way, so no failover.

Pure Python plus orjson: no I/O, no trio, no httpx. Imports nothing from the gateway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

import orjson

# ``Failure.upstream_code`` of a failure that is the gateway's own: it ran out of open
# files or memory while reaching the upstream (no failover, the key is not blamed).
LOCAL_RESOURCES = "gateway_resources"


class FailureClass(StrEnum):
    """What kind of upstream failure happened."""

    TRANSIENT = "transient"
    TIMEOUT = "timeout"
    CONNECT = "connect"
    RATE_LIMITED = "rate_limited"
    QUOTA = "quota"
    CREDENTIAL = "credential"
    CALLER = "caller"
    MODEL_NOT_FOUND = "model_not_found"


@dataclass(frozen=True, slots=True)
class Failure:
    """The verdict on one upstream failure.

    ``failover``: the router should try another key. ``affects_health``: the failure is
    reported to the key's health machine. ``upstream_message`` is for logs only.
    """

    kind: FailureClass
    failover: bool
    affects_health: bool
    status: int | None = None
    retry_after_s: float | None = None
    upstream_type: str | None = None
    upstream_code: str | None = None
    upstream_message: str | None = None


# kind -> (failover, affects_health)
_POLICY: dict[FailureClass, tuple[bool, bool]] = {
    FailureClass.TRANSIENT: (True, True),
    FailureClass.TIMEOUT: (True, True),
    FailureClass.CONNECT: (True, True),
    FailureClass.RATE_LIMITED: (True, True),
    FailureClass.QUOTA: (True, True),
    FailureClass.CREDENTIAL: (True, True),
    FailureClass.CALLER: (False, False),
    FailureClass.MODEL_NOT_FOUND: (True, False),
}

#: Error ``type``/``code`` values (lower-cased) that mean the account is out of money/quota.
QUOTA_SIGNALS = frozenset(
    {
        "insufficient_quota",
        "billing_hard_limit_reached",
        "billing_not_active",
        "insufficient_balance",
        "quota_exceeded",
    }
)
#: ... that mean the key itself is invalid, revoked or not allowed.
CREDENTIAL_SIGNALS = frozenset(
    {
        "invalid_api_key",
        "invalid_authentication",
        "authentication_error",
        "account_deactivated",
        "invalid_organization",
        "no_such_organization",
        "unsupported_country_region_territory",
    }
)
#: ... that mean this upstream does not serve the requested model.
MODEL_NOT_FOUND_SIGNALS = frozenset({"model_not_found", "model_not_available"})
#: ... that mean the client's request itself was refused; no other key would accept it.
CALLER_SIGNALS = frozenset(
    {
        "context_length_exceeded",
        "string_above_max_length",
        "content_policy_violation",
        "content_filter",
        "invalid_prompt",
        "request_too_large",
    }
)
#: ... that mean a (temporary) rate limit.
RATE_LIMIT_SIGNALS = frozenset({"rate_limit_exceeded", "rate_limit_error"})
#: ... that mean the upstream is overloaded or broken right now.
TRANSIENT_SIGNALS = frozenset(
    {"server_error", "api_error", "overloaded_error", "service_unavailable", "engine_overloaded"}
)

# Checked in this order: the more specific and more severe verdicts first.
_SIGNAL_TABLE: tuple[tuple[frozenset[str], FailureClass], ...] = (
    (QUOTA_SIGNALS, FailureClass.QUOTA),
    (CREDENTIAL_SIGNALS, FailureClass.CREDENTIAL),
    (MODEL_NOT_FOUND_SIGNALS, FailureClass.MODEL_NOT_FOUND),
    (CALLER_SIGNALS, FailureClass.CALLER),
    (RATE_LIMIT_SIGNALS, FailureClass.RATE_LIMITED),
    (TRANSIENT_SIGNALS, FailureClass.TRANSIENT),
)

_TRANSIENT_4XX = frozenset({408, 409, 425})

# Error bodies are small; anything bigger is not an OpenAI error object worth parsing.
_MAX_ERROR_BODY_BYTES = 64 * 1024


def _as_str(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _error_fields(body: bytes | None) -> tuple[str | None, str | None, str | None]:
    """Extract (type, code, message) from an OpenAI-style error body, tolerating variants.

    Accepts ``{"error": {...}}``, a bare ``{"type", "code", "message"}`` object, and a list
    whose first element is one of those (some OpenAI-compatible upstreams wrap errors).
    """
    if not body or len(body) > _MAX_ERROR_BODY_BYTES:
        return None, None, None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None, None
    if isinstance(doc, list) and doc:
        doc = doc[0]
    if not isinstance(doc, dict):
        return None, None, None
    err = doc.get("error")
    if isinstance(err, dict):
        obj: dict[str, Any] = err
    elif isinstance(err, str):
        return None, None, err
    else:
        obj = doc
    message = obj.get("message")
    return (
        _as_str(obj.get("type")),
        _as_str(obj.get("code")),
        message if isinstance(message, str) else None,
    )


def _kind_from_status(status: int | None) -> FailureClass:
    if status is None or status < 400:
        return FailureClass.TRANSIENT
    if status in (401, 403):
        return FailureClass.CREDENTIAL
    if status == 402:
        return FailureClass.QUOTA
    if status == 429:
        return FailureClass.RATE_LIMITED
    if status in _TRANSIENT_4XX or status >= 500:
        return FailureClass.TRANSIENT
    return FailureClass.CALLER


def _make(
    kind: FailureClass,
    status: int | None,
    retry_after_s: float | None,
    upstream_type: str | None = None,
    upstream_code: str | None = None,
    upstream_message: str | None = None,
) -> Failure:
    failover, affects_health = _POLICY[kind]
    return Failure(
        kind=kind,
        failover=failover,
        affects_health=affects_health,
        status=status,
        retry_after_s=retry_after_s,
        upstream_type=upstream_type,
        upstream_code=upstream_code,
        upstream_message=upstream_message,
    )


def classify(
    status: int | None,
    body: bytes | None,
    *,
    timeout: bool = False,
    connect_error: bool = False,
    retry_after_s: float | None = None,
) -> Failure:
    """Classify one upstream failure; see the module docstring for the table.

    ``status`` is the upstream HTTP status (None when no response arrived, or for an error
    event inside a 200 stream), ``body`` the error body or stream payload.
    ``retry_after_s`` is the already-parsed ``Retry-After`` (see :func:`parse_retry_after`)
    and is passed through unchanged.
    """
    if connect_error:
        return _make(FailureClass.CONNECT, status, retry_after_s)
    if timeout:
        return _make(FailureClass.TIMEOUT, status, retry_after_s)
    err_type, err_code, message = _error_fields(body)
    signals = {s.lower() for s in (err_type, err_code) if s is not None}
    kind: FailureClass | None = None
    if signals:
        for table, candidate in _SIGNAL_TABLE:
            if not signals.isdisjoint(table):
                kind = candidate
                break
    if kind is None:
        kind = _kind_from_status(status)
    return _make(kind, status, retry_after_s, err_type, err_code, message)


def parse_retry_after(value: str | None, now_epoch: float) -> float | None:
    """Seconds to wait according to a ``Retry-After`` header value.

    Accepts delay-seconds (leniently, also a decimal like ``1.5``) or an HTTP-date, which is
    turned into seconds relative to ``now_epoch`` (Unix time). A date in the past gives 0.0.
    Returns None for a missing or unparseable value, never a negative or non-finite number.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            return None
        return seconds
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC with unknown local zone; HTTP dates are UTC
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_epoch)
