"""The one ``GatewayError`` hierarchy.

Each class declares its HTTP status, OpenAI error ``type`` and ``code``, and whether the
client may retry. The /v1 surface renders these as OpenAI error JSON; the /api surface as
``{"error": {"message", "code"}}``. Imports nothing from the gateway.
"""

from __future__ import annotations

from typing import ClassVar


class GatewayError(Exception):
    """Base class: a failure we can explain to the caller."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: str | None = None  # a class default; an instance may name a more precise one
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: float | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        if code is not None:
            self.code = code


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code: str | None = None


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class AccountDisabled(PermissionDenied):
    code = "account_disabled"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimited(GatewayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"
    retryable = True


class QuotaExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"
    retryable = False


class PlanExpired(QuotaExceeded):
    code = "plan_expired"


class UpstreamError(GatewayError):
    """The upstream failed and no other key could serve the request."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"
    retryable = True


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class NoCapacity(GatewayError):
    """Every key for the model is busy, cooling or disabled."""

    status = 503
    type = "server_error"
    code = "no_capacity"
    retryable = True


class Unavailable(GatewayError):
    """A dependency (the database) failed; nothing was charged. Retry."""

    status = 503
    type = "server_error"
    code = "service_unavailable"
    retryable = True


class Overloaded(RateLimited):
    """The gateway sheds load instead of queueing for seconds."""

    code = "gateway_overloaded"


def openai_error_body(err: GatewayError) -> dict[str, object]:
    """The OpenAI error envelope for ``err``."""
    return {
        "error": {
            "message": err.message,
            "type": err.type,
            "param": err.param,
            "code": err.code,
        }
    }
