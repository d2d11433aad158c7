"""OpenAI-compatible HTTP server over an Engine (FastAPI; run by uvicorn).

POST /v1/completions, POST /v1/chat/completions (``stream: true`` -> server-sent events),
GET /v1/models, GET /health, GET /metrics. Every error is OpenAI's error body with a proper
status: 400 bad input, 404 unknown model/route, 413 oversized body, 429 queue full (with
Retry-After). Requests are continuously batched by the engine's scheduler; a client that
disconnects mid-stream cancels its request, whose rows leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rag_engine.engine_serve import asubmit
from rag_engine.scheduler import QueueFullError
from rag_engine.serve.metrics import ServerMetrics
from rag_engine.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    documents_json,
    error_json,
    new_id,
    now,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "rag-engine"
    max_body_bytes: int = 1 << 20
    max_in_flight: int = 96  # requests being retrieved, queued or generated (then 429)
    default_max_tokens: int = 128
    retry_after_s: int = 1


class _ChunkedBodyLimit:
    """ASGI middleware: a body sent without content-length (chunked) is counted as it arrives and
    refused past ``limit`` bytes (the content-length check cannot see it). The refusal is an
    HTTPException(413), which FastAPI's body parsing passes through to the error handler."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or any(k.lower() == b"content-length" for k, _ in scope.get("headers", ())):
            return await self.app(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise StarletteHTTPException(413, f"request body exceeds the limit of {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


def _usage(metrics: dict) -> dict:
    usage = {"prompt_tokens": int(metrics["prompt_tokens"]), "completion_tokens": int(metrics["completion_tokens"])}
    return usage | {"total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


class BadRequest(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.headers = status, kind, code, headers


def create_app(engine, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (its scheduler starts on the first request)."""
    cfg = config or ServerConfig()
    app = FastAPI(title="rag-engine", docs_url=None, redoc_url=None)
    metrics = ServerMetrics()
    state = {"in_flight": 0}
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, cfg

    def fail(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
             headers: dict | None = None) -> JSONResponse:
        return JSONResponse(error_json(message, kind, code), status_code=status, headers=headers)

    app.add_middleware(_ChunkedBodyLimit, limit=cfg.max_body_bytes)

    @app.middleware("http")
    async def bound_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            metrics.request(request.url.path, 413)
            return fail(413, f"request body of {length} bytes exceeds the limit of {cfg.max_body_bytes} bytes",
                        code="request_too_large")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        message = f"{where}: {first.get('msg', 'invalid request')}"
        if first.get("type") == "json_invalid":
            message = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
        metrics.request(request.url.path, 400)
        return fail(400, message, code=first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        metrics.request(request.url.path, exc.status_code)
        return fail(exc.status_code, str(exc.detail),
                    code={404: "not_found", 413: "request_too_large"}.get(exc.status_code))

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        metrics.request(request.url.path, exc.status)
        return fail(exc.status, str(exc), exc.kind, exc.code, exc.headers)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "rag-engine"}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    async def start(body, messages=None):
        if body.model not in (None, cfg.model_name):
            raise BadRequest(404, f"model {body.model!r} does not exist; this server serves {cfg.model_name!r}",
                             code="model_not_found")
        if state["in_flight"] >= cfg.max_in_flight:
            raise BadRequest(429, f"{state['in_flight']} requests in flight (bound {cfg.max_in_flight})",
                             "rate_limit_error", "too_many_requests", {"Retry-After": str(cfg.retry_after_s)})
        try:
            params = body.sampling(cfg.default_max_tokens)
            question = body.question()
            k = engine.config.k if body.k is None else body.k
            chat = messages if k == 0 else None
            state["in_flight"] += 1
            try:
                return await asubmit(engine, question, params, k, body.mode, body.retriever, None, chat,
                                     fit_max_tokens=body.max_tokens is None)
            except BaseException:
                state["in_flight"] -= 1
                raise
        except QueueFullError as exc:
            raise BadRequest(429, str(exc), "rate_limit_error", "too_many_requests",
                             {"Retry-After": str(max(1, round(exc.retry_after)))}) from exc
        except (ValueError, TypeError) as exc:
            raise BadRequest(400, str(exc)) from exc

    def finished(handle) -> None:
        state["in_flight"] -= 1
        if handle.output is not None:
            metrics.finished(handle.output.metrics)

    async def respond(endpoint: str, body, handle, chat: bool):
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        kind = "chat.completion" if chat else "text_completion"
        docs = documents_json(handle.documents)
        if not body.stream:

            async def result() -> JSONResponse | None:
                try:
                    out = await handle.aresult()
                except Exception as exc:  # the request failed inside the engine: an OpenAI error body
                    log.error("request failed: %s: %s", type(exc).__name__, exc)
                    metrics.request(endpoint, 500)
                    return fail(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
                finally:
                    finished(handle)
                if out is None:  # cancelled: the client is gone
                    return None
                metrics.request(endpoint, 200)
                choice = ({"index": 0, "message": {"role": "assistant", "content": out.text}} if chat
                          else {"index": 0, "text": out.text, "logprobs": None})
                return JSONResponse({"id": rid, "object": kind, "created": created, "model": cfg.model_name,
                                     "choices": [choice | {"finish_reason": out.finish_reason}],
                                     "usage": _usage(out.metrics), "documents": docs})

            return _PendingResponse(result(), handle)

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                d = ({"role": "assistant", "content": delta or ""} if first else
                     ({"content": delta} if delta else {}))
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            payload = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created,
                       "model": cfg.model_name, "choices": [choice]}
            if first:
                payload["documents"] = docs
            return f"data: {json.dumps(payload)}\n\n"

        async def events():
            yield chunk(None, None, first=True)
            try:
                async for delta in handle.adeltas():
                    yield chunk(delta, None)
            except Exception as exc:  # failed inside the engine: say so in the stream, then end it
                log.error("streamed request failed: %s: %s", type(exc).__name__, exc)
                err = error_json(f"generation failed: {type(exc).__name__}: {exc}", "server_error")
                yield f"data: {json.dumps(err)}\n\n"
                return
            if handle.output is None:  # cancelled
                return
            yield chunk(None, handle.output.finish_reason)
            if (body.stream_options or {}).get("include_usage"):  # OpenAI: one more chunk, no choices
                yield "data: " + json.dumps({"id": rid, "object": kind + ".chunk" if chat else kind,
                                             "created": created, "model": cfg.model_name, "choices": [],
                                             "usage": _usage(handle.output.metrics)}) + "\n\n"
            yield "data: [DONE]\n\n"

        metrics.request(endpoint, 200)
        return _EventStream(events(), lambda: finished(handle), handle)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await respond("/v1/completions", body, await start(body), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        return await respond("/v1/chat/completions", body, await start(body, messages), chat=True)

    return app


async def _cancel_on_disconnect(receive, handle) -> None:
    """ASGI >= 2.4 servers report a gone client only through receive()."""
    while (await receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


class _PendingResponse(Response):
    """A JSON answer still being generated: sent when ready, or never if the client leaves first
    (its request is cancelled then, freeing its rows at the scheduler's next step)."""

    def __init__(self, result, handle) -> None:
        super().__init__()
        self.result, self.handle = result, handle

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, self.handle))
        try:
            response = await self.result
        finally:
            watcher.cancel()
        if response is not None:
            await response(scope, receive, send)


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their request when the client leaves before the end
    (Starlette stops iterating on a disconnect and may never close the generator)."""

    def __init__(self, content, on_close, handle) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.on_close, self.handle = on_close, handle

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, self.handle))
        try:
            await super().__call__(scope, receive, send)
        finally:
            watcher.cancel()
            if self.handle.output is None:
                self.handle.cancel()  # frees its rows at the scheduler's next step
            self.on_close()


def serve(engine, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None) -> None:
    """Run the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(engine, config), host=host, port=port, log_level="info")
