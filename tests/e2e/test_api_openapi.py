"""/openapi.json describes every route, and is a valid OpenAPI 3 document."""

from __future__ import annotations

import re

import httpx
from openapi_spec_validator import validate

from proxy.app import build_quart
from tests.e2e.conftest import Harness


async def test_every_route_is_described_and_the_document_is_valid(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.base_url) as api:
        response = await api.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    paths = document["paths"]
    for rule in build_quart(harness.gw).url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            assert method.lower() in paths[path], f"{method} {path} is not described"
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"):
        assert path in paths


async def test_api_responses_carry_a_request_id(harness: Harness) -> None:
    async with httpx.AsyncClient(base_url=harness.base_url) as api:
        ok = await api.get("/api/health")
        missing = await api.get("/api/nothing-here")
    for response in (ok, missing):
        assert response.headers["x-request-id"].startswith("req_")
    assert ok.headers["x-request-id"] != missing.headers["x-request-id"]
