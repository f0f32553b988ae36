"""The OpenAI-compatible /v1 surface, as a raw ASGI app (the hot path).

Owns parse → admit → dispatch → relay → bill for ``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings`` and ``GET /v1/models``. Every response carries an
``x-request-id``; every error is OpenAI's error JSON. Streams are relayed as they arrive,
with ``: ping`` comments while the upstream is idle, and a client that goes away cancels
the upstream request. Billing runs shielded in ``finally``, exactly once per request.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from typing import Any

import orjson
import trio

from proxy.asgi import (
    BodyTooLargeError,
    ClientGone,
    Receive,
    Scope,
    Send,
    drain_body,
    header,
    read_body,
)
from proxy.asgi import send_response as send_whole
from proxy.gateway import Gateway
from proxy.v1_request import ROUTES, parse_request
from proxy.v1_stream import StreamOpener, relay_reply
from store.errors import StoreError
from workers.dispatch import Reply, Request
from workers.errors import (
    AuthenticationFailed,
    BodyTooLarge,
    GatewayError,
    InvalidRequest,
    NotFound,
    Unavailable,
    openai_error_body,
)
from workers.pricing import micro_to_price
from workers.tokens import estimate_prompt_tokens

_JSON = (b"content-type", b"application/json")
_DISCONNECTED = 499  # nginx's "client closed request", recorded in usage
access = logging.getLogger("airgate.access")
log = logging.getLogger("airgate.v1")


class V1App:
    def __init__(self, gateway: Gateway) -> None:
        self._gw = gateway
        self._ping_s = gateway.settings.ping_interval_s
        self._limit = gateway.settings.max_body_bytes
        self._access_log = gateway.settings.access_log
        self._max_waiting = gateway.settings.max_waiting_requests
        self._admission = gateway.admission
        self._waiting = 0  # requests admitted and not yet answered by an upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = "req_" + secrets.token_hex(12)
        rid = (b"x-request-id", request_id.encode())
        path: str = scope["path"]
        route = path.rstrip("/")
        metrics = self._gw.metrics
        started = time.perf_counter()
        status = 200
        entered = False
        body_read = False  # _complete reads the body before anything else
        try:
            if route in ROUTES:
                if not self._admission.try_enter():
                    # Refused at the door, before auth and body parsing: the cheapest answer.
                    raise self._gw.dispatcher.overloaded()
                entered = True
            if route == "/v1/models":
                await self._models(scope, send, rid)
            elif route not in ROUTES:
                raise NotFound(f"Invalid URL ({scope['method']} {path})")
            elif scope["method"] != "POST":
                raise InvalidRequest(f"Method {scope['method']} not allowed on {path}")
            else:
                body_read = True
                status = await self._complete(scope, receive, send, request_id, rid, route)
        except GatewayError as err:
            status = err.status
            if not body_read:
                # Answered before its body was read (refused at the door, a wrong route):
                # read it first, or hypercorn cannot reuse the connection and closes it,
                # and a close with unread bytes is a reset that can lose the answer.
                await drain_body(scope, receive, self._limit)
            metrics.requests.labels(route if route in ROUTES else "other", "",
                                    f"{err.status // 100}xx").inc()
            await send_error(send, err, rid)
        except ClientGone:
            status = _DISCONNECTED
        except StoreError as exc:  # the database failed before anything was dispatched
            log.warning("request %s refused: database error %s", request_id, exc)
            status = 503
            await send_error(send, Unavailable("Service temporarily unavailable; retry.",
                                               retry_after_s=1.0), rid)
        finally:
            if entered:
                self._admission.leave()
        if self._access_log and access.isEnabledFor(logging.INFO):
            access.info("request", extra={
                "request_id": request_id, "method": scope["method"], "path": path,
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2)})

    async def _complete(
        self, scope: Scope, receive: Receive, send: Send, request_id: str,
        rid: tuple[bytes, bytes], route: str,
    ) -> int:
        """Serve one completion request; return the status recorded for it.

        The body is read first, so that every answer (a bad key's 401 too) comes after
        it: see the drain in ``__call__``."""
        gw = self._gw
        try:
            raw = await read_body(scope, receive, self._limit)
        except BodyTooLargeError:
            raise BodyTooLarge(f"Request body is larger than {self._limit} bytes.") from None
        owner, account = await gw.accounts.authenticate(_bearer(scope))
        endpoint, upstream_path = ROUTES[route]
        parsed = parse_request(raw, endpoint)
        prompt = estimate_prompt_tokens(parsed.body, endpoint)
        # Load shedding: past this many requests waiting for their first upstream byte,
        # answer 429 at once rather than queue for seconds.
        if self._waiting >= self._max_waiting:
            raise gw.dispatcher.overloaded()
        self._waiting += 1
        waiting = [True]
        try:
            budget = await gw.dispatcher.admit(parsed.model, account, prompt,
                                               prompt + parsed.max_output)
        except BaseException:
            self._stop_waiting(waiting)
            raise
        req = Request(
            request_id=request_id, endpoint=endpoint, upstream_path=upstream_path,
            body=parsed.body, raw_body=raw, model=parsed.model, stream=parsed.stream,
            include_usage=parsed.include_usage, prompt_estimate=prompt,
            max_output=parsed.max_output, owner=owner, account=account,
            opener=StreamOpener(send, rid) if parsed.stream else None,
        )
        reply: Reply | None = None
        status = 500
        reply_done = [False]
        if req.stream:
            gw.metrics.active_streams.inc()
        try:
            with trio.CancelScope() as scope_guard:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_disconnect, receive, scope_guard)
                    try:
                        try:
                            reply = await gw.dispatcher.open(req, max(budget - prompt, 0))
                        finally:
                            self._stop_waiting(waiting)
                    except GatewayError as err:
                        status = err.status
                        reply_done[0] = True
                        await send_error(send, err, rid)
                    else:
                        status = reply.started.status
                        await relay_reply(send, reply, rid, reply_done, self._ping_s)
                    nursery.cancel_scope.cancel()
            # hypercorn also reports a disconnect once a reply is complete, and a client
            # that has its stream's [DONE] may hang up before our last byte: not a 499.
            if scope_guard.cancelled_caught and not reply_done[0] \
                    and not (reply is not None and reply.job.counter.done):
                status = _DISCONNECTED
        finally:
            self._stop_waiting(waiting)
            if req.stream:
                gw.metrics.active_streams.dec()
            with trio.CancelScope(shield=True):
                await gw.dispatcher.finish(req, prompt, reply, status)
            elapsed = trio.current_time() - req.started_at
            gw.metrics.requests.labels(route, req.model, f"{status // 100}xx").inc()
            gw.metrics.by_route(req.endpoint)[0].observe(elapsed)
        return status

    def _stop_waiting(self, waiting: list[bool]) -> None:
        if waiting[0]:
            waiting[0] = False
            self._waiting -= 1

    async def _models(self, scope: Scope, send: Send, rid: tuple[bytes, bytes]) -> None:
        if header(scope, b"authorization") is not None:
            await self._gw.accounts.authenticate(_bearer(scope))
        data: list[dict[str, Any]] = []
        for model in self._gw.catalog.models.values():
            if model.status != "active":
                continue
            data.append({
                "id": model.id, "object": "model",
                "created": int(model.created_at.timestamp()), "owned_by": model.owned_by,
                "display_name": model.display_name,
                "pricing": {
                    "input_price": micro_to_price(model.input_price),
                    "output_price": micro_to_price(model.output_price),
                    "cached_price": micro_to_price(model.cached_price),
                    "status": model.status,
                },
            })
        body = orjson.dumps({"object": "list", "data": data})
        await send_whole(send, 200, body, [_JSON, rid])


async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    """Cancel the request's work the moment the client goes away."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


def _bearer(scope: Scope) -> str:
    value = header(scope, b"authorization")
    if value is None:
        raise AuthenticationFailed(
            "You didn't provide an API key. Provide it as 'Authorization: Bearer sk-...'."
        )
    scheme, _, token = value.decode("latin-1").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("Malformed Authorization header; expected 'Bearer sk-...'.")
    return token.strip()


async def send_error(send: Send, err: GatewayError, rid: tuple[bytes, bytes]) -> None:
    status, headers, body = error_response(err, rid)
    await send_whole(send, status, body, headers)


def error_response(
    err: GatewayError, rid: tuple[bytes, bytes]
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) of the OpenAI error JSON answering ``err``."""
    headers = [_JSON, rid]
    if err.retry_after_s is not None:
        # Whole seconds for every client, and milliseconds for those that read them (the
        # openai SDKs prefer ``retry-after-ms``): a shed request may come back sooner.
        headers.append((b"retry-after", str(max(1, math.ceil(err.retry_after_s))).encode()))
        headers.append((b"retry-after-ms", str(max(1, round(err.retry_after_s * 1000))).encode()))
    if err.code in ("insufficient_quota", "plan_expired") or not err.retryable:
        headers.append((b"x-should-retry", b"false"))
    return err.status, headers, orjson.dumps(openai_error_body(err))
