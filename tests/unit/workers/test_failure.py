"""The failure classifier: status x error type x error code, table-driven."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.failure import Failure, FailureClass, classify, parse_retry_after

T = FailureClass.TRANSIENT
RL = FailureClass.RATE_LIMITED
Q = FailureClass.QUOTA
CRED = FailureClass.CREDENTIAL
CALL = FailureClass.CALLER
MNF = FailureClass.MODEL_NOT_FOUND


def _body(type_: str | None, code: str | int | None, message: str = "m") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code}})


@pytest.mark.parametrize(
    ("status", "type_", "code", "kind"),
    [
        # 429: the code decides between a rate limit and an empty account.
        (429, "insufficient_quota", "insufficient_quota", Q),
        (429, "requests", "rate_limit_exceeded", RL),
        (429, "tokens", None, RL),
        (429, None, None, RL),
        (429, "rate_limit_error", None, RL),
        (429, "billing_hard_limit_reached", None, Q),
        # 401/403: the key is bad, unless the request was refused by policy.
        (401, "invalid_request_error", "invalid_api_key", CRED),
        (401, "invalid_request_error", None, CRED),
        (401, "authentication_error", None, CRED),
        (403, "permission_error", None, CRED),
        (403, None, "unsupported_country_region_territory", CRED),
        (403, "invalid_request_error", "content_policy_violation", CALL),
        (403, None, "content_filter", CALL),
        (401, "invalid_request_error", "account_deactivated", CRED),
        # 402 Payment Required: out of money, whatever the body says.
        (402, "unknown_error", None, Q),
        (402, None, None, Q),
        # Caller faults.
        (400, "invalid_request_error", "context_length_exceeded", CALL),
        (400, "invalid_request_error", None, CALL),
        (400, None, None, CALL),
        (404, "invalid_request_error", None, CALL),
        (404, "not_found_error", None, CALL),
        (413, "request_too_large", None, CALL),
        (422, None, None, CALL),
        (405, None, None, CALL),
        # ... but a 500 that says "context length exceeded" is still the caller's.
        (500, "invalid_request_error", "context_length_exceeded", CALL),
        # Model not found: fail over, don't punish the key.
        (404, "invalid_request_error", "model_not_found", MNF),
        (400, None, "model_not_found", MNF),
        (403, None, "model_not_available", MNF),
        # Transient.
        (408, None, None, T),
        (409, None, None, T),
        (425, None, None, T),
        (500, "server_error", None, T),
        (500, None, None, T),
        (502, None, None, T),
        (503, "service_unavailable", None, T),
        (529, "overloaded_error", None, T),
        (400, "overloaded_error", None, T),
        # A quota code wins over a 5xx status; a credential code over a 429.
        (500, None, "insufficient_quota", Q),
        (429, None, "invalid_api_key", CRED),
        # No status: an error event inside a 200 stream.
        (None, None, None, T),
        (None, "insufficient_quota", None, Q),
        (None, "invalid_request_error", "context_length_exceeded", CALL),
        (200, None, None, T),
        (302, None, None, T),
    ],
)
def test_table(status: int | None, type_: str | None, code: str | None, kind: FailureClass) -> None:
    failure = classify(status, _body(type_, code))
    assert failure.kind is kind
    assert failure.status == status
    assert failure.upstream_type == type_
    assert failure.upstream_code == code
    assert failure.upstream_message == "m"


@pytest.mark.parametrize(
    ("kind", "failover", "affects_health"),
    [
        (FailureClass.TRANSIENT, True, True),
        (FailureClass.TIMEOUT, True, True),
        (FailureClass.CONNECT, True, True),
        (FailureClass.RATE_LIMITED, True, True),
        (FailureClass.QUOTA, True, True),
        (FailureClass.CREDENTIAL, True, True),
        (FailureClass.CALLER, False, False),
        (FailureClass.MODEL_NOT_FOUND, True, False),
    ],
)
def test_policy_per_kind(kind: FailureClass, failover: bool, affects_health: bool) -> None:
    bodies = {
        FailureClass.TRANSIENT: (503, None),
        FailureClass.RATE_LIMITED: (429, None),
        FailureClass.QUOTA: (429, _body("insufficient_quota", None)),
        FailureClass.CREDENTIAL: (401, None),
        FailureClass.CALLER: (400, None),
        FailureClass.MODEL_NOT_FOUND: (404, _body(None, "model_not_found")),
    }
    if kind is FailureClass.TIMEOUT:
        failure = classify(None, None, timeout=True)
    elif kind is FailureClass.CONNECT:
        failure = classify(None, None, connect_error=True)
    else:
        failure = classify(*bodies[kind])
    assert (failure.kind, failure.failover, failure.affects_health) == (
        kind,
        failover,
        affects_health,
    )


def test_message_text_is_never_a_signal() -> None:
    body = _body("invalid_request_error", None, "Insufficient balance, invalid api key, quota")
    assert classify(400, body).kind is FailureClass.CALLER
    assert classify(500, body).kind is FailureClass.TRANSIENT
    assert classify(429, body).kind is FailureClass.RATE_LIMITED


def test_signals_are_case_insensitive_and_codes_may_be_ints() -> None:
    assert classify(429, _body(None, "INSUFFICIENT_QUOTA")).kind is FailureClass.QUOTA
    failure = classify(429, _body(None, 1302))
    assert (failure.kind, failure.upstream_code) == (FailureClass.RATE_LIMITED, "1302")


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b'{"error": "insufficient_quota"}', FailureClass.RATE_LIMITED),  # a string is a message
        (b'{"type": "insufficient_quota", "message": "x"}', FailureClass.QUOTA),  # unwrapped
        (b'[{"error": {"code": "insufficient_quota"}}]', FailureClass.QUOTA),  # wrapped in a list
        (b'{"type": "error", "error": {"type": "rate_limit_error"}}', FailureClass.RATE_LIMITED),
        (b"<html>Too Many Requests</html>", FailureClass.RATE_LIMITED),
        (b"", FailureClass.RATE_LIMITED),
        (None, FailureClass.RATE_LIMITED),
        (b"[]", FailureClass.RATE_LIMITED),
        (b"42", FailureClass.RATE_LIMITED),
    ],
)
def test_body_shapes(body: bytes | None, kind: FailureClass) -> None:
    assert classify(429, body).kind is kind


def test_connect_and_timeout_win_over_everything() -> None:
    body = _body("insufficient_quota", None)
    assert classify(429, body, connect_error=True).kind is FailureClass.CONNECT
    assert classify(429, body, timeout=True).kind is FailureClass.TIMEOUT
    assert classify(None, None, timeout=True, connect_error=True).kind is FailureClass.CONNECT


def test_retry_after_is_passed_through() -> None:
    assert classify(429, None, retry_after_s=2.5) == Failure(
        kind=FailureClass.RATE_LIMITED,
        failover=True,
        affects_health=True,
        status=429,
        retry_after_s=2.5,
    )


@given(st.integers(100, 599), st.one_of(st.none(), st.binary(max_size=64)))
def test_classify_is_total(status: int, body: bytes | None) -> None:
    failure = classify(status, body)
    if failure.kind is FailureClass.CALLER:
        assert not failure.failover
        assert not failure.affects_health
    if status >= 500 and not body:
        assert failure.kind is FailureClass.TRANSIENT


@pytest.mark.parametrize(
    ("value", "now", "expected"),
    [
        (None, 0.0, None),
        ("", 0.0, None),
        ("  ", 0.0, None),
        ("0", 0.0, 0.0),
        ("120", 0.0, 120.0),
        (" 7 ", 0.0, 7.0),
        ("1.5", 0.0, 1.5),
        ("-1", 0.0, None),
        ("nan", 0.0, None),
        ("inf", 0.0, None),
        ("soon", 0.0, None),
        # 2015-10-21T07:28:00Z is 1445412480 in Unix time.
        ("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0, 10.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480.0, 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 1445412490.0, 0.0),  # in the past
        ("Wed, 21 Oct 2015 07:28:00 -0000", 1445412470.0, 10.0),
        ("Wed, 32 Foo 2015 07:28:00 GMT", 0.0, None),
    ],
)
def test_parse_retry_after(value: str | None, now: float, expected: float | None) -> None:
    assert parse_retry_after(value, now) == expected
