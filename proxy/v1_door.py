"""The gateway's early door: completions refused while overloaded, before hypercorn
parses them (see ``proxy.early_refusal``).

Owns :class:`V1Door`. It refuses what ``proxy.v1.V1App`` refuses at its own door (a
POST to a completion route while the admission control sheds), with the same answer:
429 ``gateway_overloaded`` with ``retry-after`` and ``retry-after-ms``, an
``x-request-id``, the same metrics and one access-log line.
"""

from __future__ import annotations

import logging
import secrets

from proxy.early_refusal import Refusal
from proxy.gateway import Gateway
from proxy.v1 import access, error_response
from proxy.v1_request import ROUTES


class V1Door:
    """:class:`proxy.early_refusal.EarlyDoor` for the /v1 completion routes."""

    __slots__ = ("_access_log", "_admission", "_gw", "_routes")

    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._admission = gateway.admission
        self._access_log = gateway.settings.access_log
        self._routes = {route.encode(): route for route in ROUTES}

    def active(self) -> bool:
        return self._admission.limited

    def refusal(self, method: bytes, target: bytes) -> Refusal | None:
        path = target.partition(b"?")[0]
        route = self._routes.get(path.rstrip(b"/"))
        if route is None or method != b"POST" or self._admission.arrive():
            return None
        err = self._gw.dispatcher.overloaded()
        self._gw.metrics.requests.labels(route, "", f"{err.status // 100}xx").inc()
        request_id = "req_" + secrets.token_hex(12)
        if self._access_log and access.isEnabledFor(logging.INFO):
            access.info("request", extra={
                "request_id": request_id, "method": "POST", "path": path.decode("latin-1"),
                "status": err.status, "duration_ms": 0.0})
        return Refusal(*error_response(err, (b"x-request-id", request_id.encode())),
                       err.retry_after_s or 0.0)

    async def hold(self, seconds: float) -> None:
        await self._admission.hold(seconds)
