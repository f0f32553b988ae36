"""The OpenAPI 3 document, built from the app's own route table plus the /v1 routes.

Every Quart route appears (a test checks it), so a new route cannot be left out; the
request bodies and summaries below describe the ones that take input.
"""

from __future__ import annotations

import re
from typing import Any

from quart_trio import QuartTrio

Schema = dict[str, Any]


def _obj(required: list[str], **props: Schema) -> Schema:
    schema: Schema = {"type": "object", "properties": props}
    if required:  # OpenAPI 3.0 does not allow an empty list
        schema["required"] = required
    return schema


S: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
N: Schema = {"type": "number"}
B: Schema = {"type": "boolean"}
STRS: Schema = {"type": "array", "items": S}

ERROR_API = _obj(["error"], error=_obj(["message", "code"], message=S, code=S))
ERROR_V1 = _obj(["error"], error=_obj(["message", "type"], message=S, type=S,
                                      param={"type": "string", "nullable": True},
                                      code={"type": "string", "nullable": True}))
UPSTREAM_KEY = _obj([], name=S, base_url=S, api_key=S, models=STRS,
                    model_map={"type": "object", "additionalProperties": S}, weight=INT,
                    priority=INT, rpm={"type": "integer", "nullable": True},
                    tpm={"type": "integer", "nullable": True}, max_concurrency=INT,
                    status={"type": "string", "enum": ["active", "disabled"]})

# (method, path) -> (summary, request body schema or None)
DESCRIPTIONS: dict[tuple[str, str], tuple[str, Schema | None]] = {
    ("post", "/api/auth/register"): ("Register; returns a session token.",
                                     _obj(["email", "password"], email=S, password=S,
                                          invite_code=S)),
    ("post", "/api/auth/login"): ("Log in; returns a session token.",
                                  _obj(["email", "password"], email=S, password=S)),
    ("get", "/api/auth/me"): ("The caller's account, plan and quota.", None),
    ("put", "/api/auth/password"): ("Change password; older sessions end.",
                                    _obj(["oldPassword", "newPassword"], oldPassword=S,
                                         newPassword=S)),
    ("post", "/api/auth/apikey"): ("Create an sk- key (shown once).", _obj([], name=S)),
    ("delete", "/api/auth/apikey"): ("Revoke an sk- key.", _obj(["api_key"], api_key=S)),
    ("get", "/api/auth/apikeys"): ("The caller's keys, masked.", None),
    ("get", "/api/plans"): ("Plans on sale.", None),
    ("post", "/api/orders/create"): ("Buy a plan with WeChat Pay or the balance.",
                                     _obj(["planId", "paymentMethod"], planId=S,
                                          paymentMethod={"type": "string",
                                                         "enum": ["wxpay", "balance"]})),
    ("get", "/api/orders"): ("The caller's orders.", None),
    ("get", "/api/payment/qrcode"): ("code_url of a pending order; PNG with format=png.",
                                     None),
    ("post", "/api/payment/notify/wxpay"): ("WeChat Pay v3 notification (signed).", None),
    ("get", "/api/usage/stats"): ("Token quota and usage.", None),
    ("get", "/api/usage/log"): ("Recent requests, newest first (page, limit).", None),
    ("get", "/api/export/self"): ("The caller's usage, logs and orders.", None),
    ("get", "/api/models"): ("The model catalogue with prices.", None),
    ("post", "/api/invite/transfer"): ("Move rebate into balance.",
                                       _obj([], amount_fen=INT)),
    ("post", "/api/coupon/redeem"): ("Redeem a coupon code.", _obj(["code"], code=S)),
    ("get", "/api/health"): ("Liveness and the state of the database and upstreams.", None),
    ("post", "/api/admin/login"): ("Administrator login.",
                                   _obj(["email", "password"], email=S, password=S)),
    ("post", "/api/admin/upstream-keys"): ("Add an upstream key.", UPSTREAM_KEY),
    ("patch", "/api/admin/upstream-keys/{key_id}"): ("Change an upstream key.", UPSTREAM_KEY),
    ("put", "/api/admin/upstream-keys/{key_id}"): ("Change an upstream key.", UPSTREAM_KEY),
    ("patch", "/api/admin/users/{user_id}"): (
        "Disable/enable a user, adjust quota or balance (ledger row).",
        _obj([], status=S, tokenLimit_delta=INT, balance_fen_delta=INT, note=S)),
    ("post", "/api/admin/coupons"): ("Create a coupon code.",
                                     _obj(["code", "kind"], code=S, kind=S, value=INT,
                                          planId=S, maxUses=INT, expiresAt=INT)),
    ("post", "/api/admin/plans"): ("Create or replace a plan.",
                                   _obj(["id", "name", "tokenLimit", "durationDays"], id=S,
                                        name=S, price=N, price_fen=INT, tokenLimit=INT,
                                        durationDays=INT, modelGroups=STRS)),
    ("post", "/api/admin/models"): ("Create or replace a model and its prices.",
                                    _obj(["id", "display_name"], id=S, display_name=S,
                                         group=S, input_price=N, output_price=N,
                                         cached_price=N, tags=STRS)),
}

V1 = {
    "/v1/chat/completions": ("post", "Chat completion (stream with SSE when stream=true)."),
    "/v1/completions": ("post", "Legacy completion, stream or not."),
    "/v1/embeddings": ("post", "Embeddings."),
    "/v1/models": ("get", "Models with display_name and pricing; key optional."),
}

_PARAM = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")
_PUBLIC = {"/api/auth/register", "/api/auth/login", "/api/admin/login", "/api/plans",
           "/api/plans/{plan_id}", "/api/models", "/api/health", "/api/payment/notify/wxpay"}


def _operation(method: str, path: str, params: list[str]) -> Schema:
    summary, body = DESCRIPTIONS.get((method, path), (f"{method.upper()} {path}", None))
    op: Schema = {
        "summary": summary,
        "responses": {
            "200": {"description": "OK", "content": {"application/json": {"schema": {}}}},
            "default": {"description": "Error",
                        "content": {"application/json": {"schema": ERROR_API}}},
        },
    }
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": S}
                            for p in params]
    if body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": body}}}
    op["security"] = [] if path in _PUBLIC else [{"session": []}]
    return op


def build_openapi(app: QuartTrio) -> Schema:
    paths: dict[str, dict[str, Schema]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or not rule.rule.startswith("/api/"):
            continue
        path = _PARAM.sub(r"{\1}", rule.rule)
        params = _PARAM.findall(rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(method.lower(), path,
                                                                      params)
    for path, (method, summary) in V1.items():
        paths[path] = {method: {
            "summary": summary,
            "security": [{"apiKey": []}],
            "responses": {
                "200": {"description": "OpenAI-compatible response"},
                "default": {"description": "OpenAI error",
                            "content": {"application/json": {"schema": ERROR_V1}}},
            },
        }}
        if method == "post":
            paths[path][method]["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": {"type": "object", "required": ["model"],
                                                "properties": {"model": S, "stream": B}}}}}
    paths["/metrics"] = {"get": {"summary": "Prometheus metrics.", "security": [],
                                 "responses": {"200": {"description": "text format"}}}}
    paths["/openapi.json"] = {"get": {"summary": "This document.", "security": [],
                                      "responses": {"200": {"description": "OpenAPI 3"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "airgate", "version": "0.1.0",
                 "description": "OpenAI-compatible LLM gateway and reseller platform."},
        "paths": dict(sorted(paths.items())),
        "components": {"securitySchemes": {
            "session": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "apiKey": {"type": "http", "scheme": "bearer", "description": "sk- key"},
        }},
    }
