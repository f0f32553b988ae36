"""A fast, deterministic OpenAI-compatible upstream for tests, the demo and benchmarks.

Owns a raw ASGI app (:class:`MockUpstream`, no framework, for speed) serving
``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` and ``/v1/models``,
plus ``/_mock/stats`` and ``/_mock/reset`` for tests; :func:`run_mock_upstream` serves it
with hypercorn's trio worker and :func:`main` is the ``airgate mock-upstream`` CLI.

Token accounting is predictable: prompt tokens are whitespace-separated words (minimum 1),
and the completion is ``chunk_count`` pieces of ``"tok "``, one token each. The bearer key
picks a fault mode: ``mock-<mode>`` or ``mock-<mode>-<anything>`` with mode one of
``500 429 quota 401 hang cut malformed slow``; any other key is healthy. A request may
carry ``"mock": {"chunks": n, "ttft_ms": x, "chunk_delay_ms": y}`` to shape its response
(and ``"ignore_max_tokens": true`` to overrun the request's token limit).

Must not import ``proxy``, ``workers`` or ``store``: the gateway is reached only over HTTP.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import struct
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from loadtest.mock_shapes import (
    _BAD_JSON,
    _CHAT_FINISH,
    _CHAT_PIECE,
    _CHAT_ROLE,
    _DONE,
    _END,
    _FAULTS,
    _FINGERPRINT,
    _JSON_TYPE,
    _LOG,
    _MALFORMED_JSON,
    _MISSING_KEY,
    _MODELS_CREATED,
    _PIECE,
    _SLOW_TTFT_S,
    _SSE_START,
    _TEXT_FINISH,
    _TEXT_PIECE,
    MockConfig,
    MockStats,
    Receive,
    Scope,
    Segment,
    Send,
    _BadRequest,
    _bearer,
    _content_words,
    _embedding,
    _embedding_inputs,
    _error_body,
    _int_field,
    _mode,
    _plan,
    _prompt_part_tokens,
    _stream_segments,
    _usage,
    _words,
)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away first."""
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


async def _unless_disconnected(receive: Receive, work: Callable[[], Awaitable[None]]) -> bool:
    """Run ``work`` while watching for ``http.disconnect``; False if the client left first.

    hypercorn silently drops sends after a disconnect, so only ``receive()`` tells us.
    """
    finished = False

    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        async def run() -> None:
            nonlocal finished
            await work()
            finished = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        nursery.start_soon(run)
    return finished


async def _send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    all_headers = [_JSON_TYPE, (b"content-length", str(len(body)).encode())]
    if headers:
        all_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _bad_request(exc: _BadRequest) -> bytes:
    return _error_body(exc.message, "invalid_request_error", None, exc.param)


class MockUpstream:
    """The ASGI app. Its state (the stats) is touched only by its own request tasks."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.stats = MockStats()
        self._models = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": _MODELS_CREATED, "owned_by": "mock"}
                    for m in config.models
                ],
            }
        )
        self._routes: dict[tuple[str, str], Callable[..., Awaitable[None]]] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("GET", "/v1/models"): self._list_models,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        if body is None:
            return
        method, path = scope["method"], scope["path"]
        if path.startswith("/_mock/"):
            await self._introspect(method, path, send)
        elif (method, path) in self._routes:
            await self._v1(self._routes[method, path], scope, body, receive, send)
        elif path.startswith("/v1/"):
            error = _error_body(
                f"Unknown request URL: {method} {path}.", "invalid_request_error", "unknown_url"
            )
            await _send_json(send, 404, error)
        else:
            await _send_json(send, 404, _error_body("Not found.", "invalid_request_error", None))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _introspect(self, method: str, path: str, send: Send) -> None:
        if (method, path) == ("GET", "/_mock/stats"):
            await _send_json(send, 200, orjson.dumps(self.stats.snapshot()))
        elif (method, path) == ("POST", "/_mock/reset"):
            self.stats.reset()
            await _send_json(send, 200, b'{"reset":true}')
        else:
            await _send_json(send, 404, _error_body("Not found.", "invalid_request_error", None))

    async def _v1(
        self,
        handler: Callable[..., Awaitable[None]],
        scope: Scope,
        body: bytes,
        receive: Receive,
        send: Send,
    ) -> None:
        key = _bearer(scope["headers"])
        if key is None:
            await _send_json(send, 401, _MISSING_KEY)
            return
        self.stats.requests[key] = self.stats.requests.get(key, 0) + 1
        mode = _mode(key)
        if mode in _FAULTS:
            status, headers, error = _FAULTS[mode]
            await _send_json(send, status, error, headers)
            return
        if mode == "hang":
            await self._hang(receive)
            return
        request: Any = None
        if scope["method"] == "POST":
            try:
                request = orjson.loads(body)
            except orjson.JSONDecodeError:
                await _send_json(send, 400, _BAD_JSON)
                return
            if not isinstance(request, dict):
                await _send_json(send, 400, _BAD_JSON)
                return
        try:
            await handler(request, mode, receive, send)
        except _BadRequest as exc:
            await _send_json(send, 400, _bad_request(exc))

    async def _hang(self, receive: Receive) -> None:
        self.stats.active_streams += 1
        try:
            await _unless_disconnected(receive, trio.sleep_forever)
            self.stats.disconnected_streams += 1
        finally:
            self.stats.active_streams -= 1

    async def _finish_json(
        self, receive: Receive, send: Send, mode: str | None, wait_s: float, payload: bytes
    ) -> None:
        """Send a non-streaming answer after ``wait_s``, honouring ``cut`` and ``malformed``."""
        if wait_s > 0 and not await _unless_disconnected(receive, partial(trio.sleep, wait_s)):
            return
        if mode == "cut":
            # Headers promise a body that never comes; returning makes hypercorn close the
            # connection. (ASGI cannot drop a connection before the status line is sent.)
            headers = [_JSON_TYPE, (b"content-length", str(len(payload)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            return
        await _send_json(send, 200, _MALFORMED_JSON if mode == "malformed" else payload)

    async def _stream(self, receive: Receive, send: Send, segments: list[Segment]) -> None:
        complete = segments[-1][1][-1] == _DONE if segments else False
        self.stats.active_streams += 1
        delivered = False  # every event was handed over: the client may hang up now
        try:

            async def pump() -> None:
                nonlocal delivered
                await send(_SSE_START)
                # Each event is due at a fixed time from the start, as a model emits
                # tokens: a late send does not push the later ones back.
                due = trio.current_time()
                for delay_s, parts in segments:
                    if delay_s > 0:
                        due += delay_s
                        await trio.sleep_until(due)
                    body = b"".join(parts)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                delivered = True
                if complete:
                    # Over a real socket hypercorn may report the client's hang-up while
                    # this last send is in flight; the stream was complete all the same.
                    await send(_END)

            if len(segments) <= 1:
                await pump()
                finished = True
            else:
                finished = await _unless_disconnected(receive, pump) or delivered
            if not finished:
                self.stats.disconnected_streams += 1
            elif complete:
                self.stats.completed_streams += 1
        finally:
            self.stats.active_streams -= 1

    async def _chat(
        self, request: dict[str, Any], mode: str | None, receive: Receive, send: Send
    ) -> None:
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("messages must be a non-empty array", "messages")
        prompt_tokens = max(
            1, sum(_content_words(m.get("content")) for m in messages if isinstance(m, dict))
        )
        await self._generate(request, mode, receive, send, prompt_tokens, chat=True)

    async def _completions(
        self, request: dict[str, Any], mode: str | None, receive: Receive, send: Send
    ) -> None:
        prompt = request.get("prompt")
        if isinstance(prompt, str):
            words = _words(prompt)
        elif isinstance(prompt, list):
            words = sum(_prompt_part_tokens(p) for p in prompt)
        else:
            raise _BadRequest("prompt must be a string or an array", "prompt")
        await self._generate(request, mode, receive, send, max(1, words), chat=False)

    async def _generate(
        self,
        request: dict[str, Any],
        mode: str | None,
        receive: Receive,
        send: Send,
        prompt_tokens: int,
        *,
        chat: bool,
    ) -> None:
        model = request.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("model must be a non-empty string", "model")
        plan = _plan(self.config, request, mode)
        usage = _usage(prompt_tokens, plan.chunks)
        created = int(time.time())
        prefix, obj = ("chatcmpl-", "chat.completion") if chat else ("cmpl-", "text_completion")
        ident = prefix + os.urandom(12).hex()
        if not request.get("stream"):
            if chat:
                message = {"role": "assistant", "content": _PIECE * plan.chunks, "refusal": None}
                choice = {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": plan.finish_reason,
                }
            else:
                choice = {
                    "text": _PIECE * plan.chunks,
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": plan.finish_reason,
                }
            payload = orjson.dumps(
                {
                    "id": ident,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "system_fingerprint": _FINGERPRINT,
                    "choices": [choice],
                    "usage": usage,
                }
            )
            await self._finish_json(receive, send, mode, plan.wait_s, payload)
            return
        options = request.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        head = orjson.dumps(
            {
                "id": ident,
                "object": obj + ".chunk" if chat else obj,
                "created": created,
                "model": model,
                "system_fingerprint": _FINGERPRINT,
            }
        )
        start = b"data: " + head[:-1] + b',"choices":['
        end = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
        finishes = _CHAT_FINISH if chat else _TEXT_FINISH
        events = {
            "piece": start + (_CHAT_PIECE if chat else _TEXT_PIECE) + end,
            "finish": start + finishes[plan.finish_reason] + end,
        }
        if chat:
            events["role"] = start + _CHAT_ROLE + end
        if include_usage:
            events["usage"] = start + b'],"usage":' + orjson.dumps(usage) + b"}\n\n"
        await self._stream(receive, send, _stream_segments(plan, events, mode))

    async def _embeddings(
        self, request: dict[str, Any], mode: str | None, receive: Receive, send: Send
    ) -> None:
        model = request.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("model must be a non-empty string", "model")
        inputs = _embedding_inputs(request.get("input"))
        dim = _int_field(request, "dimensions", self.config.embedding_dim, 1)
        as_base64 = request.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            vector = _embedding(item, dim)
            encoded: list[float] | str = (
                base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = max(1, sum(_words(i) if isinstance(i, str) else len(i) for i in inputs))
        payload = orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
        wait_s = _plan(self.config, request, mode).ttft_s
        await self._finish_json(receive, send, mode, wait_s, payload)

    async def _list_models(
        self, request: None, mode: str | None, receive: Receive, send: Send
    ) -> None:
        await self._finish_json(
            receive, send, mode, _SLOW_TTFT_S if mode == "slow" else 0, self._models
        )


async def run_mock_upstream(
    config: MockConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: tuple[str, str] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the mock until cancelled; ``task_status.started(port)`` once listening.
    ``tls``: (certificate file, key file) to serve https instead of http.

    With ``port=0`` the kernel picks the port: hypercorn binds the socket and reports the
    bound address (``getsockname``) through its own ``task_status``, which we parse.
    """
    hyper = HypercornConfig()
    if tls is not None:
        hyper.certfile, hyper.keyfile = tls
    hyper.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hyper.accesslog = None
    hyper.errorlog = _LOG
    hyper.backlog = 1024
    hyper.keep_alive_max_requests = 1_000_000
    hyper.include_date_header = False
    app = MockUpstream(config)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(partial(serve, cast(Any, app), hyper, mode="asgi"))
        task_status.started(int(binds[0].rsplit(":", 1)[1]))


async def _serve_and_announce(
    config: MockConfig, host: str, port: int, tls: tuple[str, str] | None
) -> None:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(partial(run_mock_upstream, config, host=host, port=port,
                                            tls=tls))
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if tls else "http"
        print(f"mock upstream listening on {scheme}://{shown}:{bound}/v1", flush=True)
        # Ctrl-C or SIGTERM stops serving by cancellation, so the CLI exits quietly.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> None:
    """``airgate mock-upstream``: serve the mock in the foreground until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="airgate mock-upstream", description="Serve a fast OpenAI-compatible mock upstream."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="delay before first token")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between chunks")
    parser.add_argument("--chunks", type=int, default=20, help="completion tokens per answer")
    parser.add_argument("--embedding-dim", type=int, default=8)
    parser.add_argument("--certfile", help="serve https with this certificate (PEM)")
    parser.add_argument("--keyfile", help="and this private key (PEM)")
    args = parser.parse_args(argv)
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("--certfile and --keyfile go together")
    config = MockConfig(
        ttft_ms=args.ttft_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        chunk_count=args.chunks,
        embedding_dim=args.embedding_dim,
    )
    tls = (args.certfile, args.keyfile) if args.certfile else None
    trio.run(_serve_and_announce, config, args.host, args.port, tls)


if __name__ == "__main__":
    main()


__all__ = ["MockConfig", "MockStats", "MockUpstream", "main", "run_mock_upstream"]
