"""The ASGI application: the raw /v1 app and /metrics in front of the Quart account app.

Owns the routing between the two and the /api error rendering: every error on /api is
``{"error": {"message", "code"}}`` with the right status, never a stack trace.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import MutableMapping
from typing import Any

import orjson
import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from proxy.api import (
    account,
    admin_catalog,
    admin_keys,
    admin_users,
    auth,
    exports,
    health,
    payment,
    shop,
)
from proxy.api.common import api_error_body
from proxy.asgi import ASGIApp, Receive, Scope, Send, send_response
from proxy.gateway import Gateway
from proxy.openapi import build_openapi
from proxy.v1 import V1App
from workers.errors import GatewayError
from workers.payments import SANDBOX_PREFIX

log = logging.getLogger("airgate.api")
access = logging.getLogger("airgate.access")

_METRICS_TYPE = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")


def build_quart(gw: Gateway) -> QuartTrio:
    app = QuartTrio("airgate")
    app.config["MAX_CONTENT_LENGTH"] = gw.settings.max_body_bytes
    app.config["JSON_SORT_KEYS"] = False
    app.extensions["airgate"] = gw
    for blueprint in (auth.bp, account.bp, shop.bp, admin_keys.bp, admin_users.bp,
                      admin_catalog.bp, exports.bp, payment.bp, health.bp):
        app.register_blueprint(blueprint)

    document: dict[str, Any] = {}

    @app.get("/openapi.json")
    async def openapi() -> dict[str, Any]:
        if not document:
            document.update(build_openapi(app))
        return document

    @app.before_request
    async def stamp() -> None:
        g.request_id = "req_" + secrets.token_hex(12)
        g.started = time.perf_counter()

    @app.after_request
    async def request_id(response: Response) -> Response:
        rid = getattr(g, "request_id", None) or "req_" + secrets.token_hex(12)
        response.headers["x-request-id"] = rid
        if gw.settings.access_log:
            elapsed = time.perf_counter() - getattr(g, "started", time.perf_counter())
            access.info("request", extra={
                "request_id": rid, "method": request.method, "path": request.path,
                "status": response.status_code, "duration_ms": round(elapsed * 1000, 2)})
        return response

    @app.errorhandler(GatewayError)
    async def gateway_error(err: GatewayError) -> Response:
        response = Response(_json(api_error_body(err)), status=err.status,
                            content_type="application/json")
        if err.retry_after_s is not None:
            response.headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
        return response

    @app.errorhandler(HTTPException)
    async def http_error(err: HTTPException) -> Response:
        code = (err.name or "error").lower().replace(" ", "_")
        body = {"error": {"message": err.description or err.name, "code": code}}
        response = Response(_json(body), status=err.code or 500,
                            content_type="application/json")
        # Keep what the exception says beyond its HTML body: `Allow` on a 405 (RFC 9110).
        for name, value in err.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    async def unexpected(err: Exception) -> Response:
        log.exception("unhandled error on %s", type(err).__name__)
        body = {"error": {"message": "Internal server error.", "code": "internal_error"}}
        return Response(_json(body), status=500, content_type="application/json")

    return app


def _json(data: Any) -> bytes:
    return orjson.dumps(data)


def _finish_shielded(send: Send) -> Send:
    """Quart's ``send`` with the last body message shielded from cancellation.

    hypercorn does its after-response bookkeeping inside that last send, in the app's
    task: it tells the app the stream is closed (``http.disconnect``), then arms the
    connection's idle timer. Quart cancels its handler as soon as it sees the disconnect,
    which cut the send short before the timer was armed: every keep-alive connection
    that had served an ``/api`` request was then never closed, neither after
    ``keep_alive_timeout`` nor at shutdown (SIGTERM waited the whole grace period)."""

    async def guarded(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True):
                await send(message)
        else:
            await send(message)

    return guarded


def _body_before_answer(receive: Receive, send: Send) -> tuple[Receive, Send]:
    """Quart's ``receive`` and ``send``, with the answer held until the request body has
    been received (at most 1 s), as the /v1 app reads it before answering.

    Quart reads the body in a task of its own while the handler may answer at once (a
    401 needs no body). An answer sent before the body arrived leaves hypercorn unable to
    reuse the connection: it closes it, and the close, with the body's bytes unread,
    resets it, which can lose the answer."""
    received = trio.Event()

    async def watched() -> MutableMapping[str, Any]:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            received.set()
        return message

    async def held(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start" and not received.is_set():
            with trio.move_on_after(1.0):
                await received.wait()
        await send(message)

    return watched, held


def build_app(gw: Gateway) -> ASGIApp:
    quart = build_quart(gw)
    v1 = V1App(gw)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith("/v1/") or path == "/v1":
                await v1(scope, receive, send)
                return
            sandbox = gw.payments.sandbox_app
            if sandbox is not None and path.startswith(SANDBOX_PREFIX + "/"):
                await sandbox(scope, receive, send)  # type: ignore[arg-type]
                return
            if path == "/metrics":
                await send_response(send, 200, gw.metrics.render(), [_METRICS_TYPE])
                return
        if scope["type"] == "http":
            receive, send = _body_before_answer(receive, _finish_shielded(send))
        await quart(scope, receive, send)  # type: ignore[arg-type]

    return app
