"""The FastAPI app: OpenAI-compatible `/v1/chat/completions`, `/v1/completions` (streamed as server-sent events
or whole), `/v1/models`, plus `/health` and Prometheus `/metrics`.

Admission happens before a request is queued, in this order: API key (401), rate limit (429), body size (413),
JSON and fields (400), model name (404), method override (400), prompt length and context (400), KV budget
(503), queue room (429 with Retry-After). The response (status and headers) is sent only once the prefill is
done, so errors of the prefill are still real HTTP errors; after that, a stream carries an error as an event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from ..compressor import Compressor
from ..errors import KVFoldError
from .config import ServeConfig, servable
from .engine import Engine
from .jobs import Event, GenerationRequest, Job, QueueFull
from .metrics import Metrics
from .protocol import APIError, ChatRequest, CompletionRequest, Reply, parse_body, sse
from .security import Authenticator, RateLimiter, read_body

logger = logging.getLogger("kvfold.serve")
POLL_S = 0.25  # how often a waiting handler checks that its client is still connected


class ClientGone(Exception):
    """The client closed the connection before the response started."""


class CountRequests:
    """Pure ASGI middleware counting responses by endpoint and status (no BaseHTTPMiddleware: it would buffer
    the event streams and hide client disconnects)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.record_request(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(model, tokenizer, config: ServeConfig) -> FastAPI:
    """An app serving `model` with `config`; its engine thread starts and stops with the app's lifespan."""
    metrics = Metrics()
    engine = Engine(model, tokenizer, config, metrics)
    auth, limiter = Authenticator(config.api_keys), RateLimiter(config.rate_limit)
    vocab = model.config.get_text_config().vocab_size

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="kvfold serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config
    app.add_middleware(CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def guard(request: Request) -> str:
        caller = auth.identify(request)
        limiter.check(caller)
        return caller

    def model_card() -> dict:
        return {"id": config.model_id, "object": "model", "created": int(metrics.started_wall), "owned_by": "kvfold",
                "kvfold": {"method": config.method, "block": config.block, "context": engine.limit}}

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = engine.alive
        return JSONResponse({"status": "ok" if alive else "down", "model": config.model_id, "method": config.method,
                             "queue": engine.queue_length}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics_endpoint(request: Request) -> PlainTextResponse:
        auth.identify(request)
        prefix, lookups = engine.prefix, engine.prefix.hits + engine.prefix.misses
        gauges = {
            "prefix_cache_hits": ("", prefix.hits), "prefix_cache_misses": ("", prefix.misses),
            "prefix_cache_evictions": ("", prefix.evictions),
            "prefix_cache_hit_rate": ("Hits / (hits + misses) of prompts with at least one full block.",
                                      prefix.hits / lookups if lookups else 0.0),
            "prefix_cache_snapshots": ("Compressed snapshots held by the prefix cache.", prefix.snapshots),
            "kv_bytes_prefix_cache": ("KV bytes held by the prefix cache: its page pools (whole capacity, shared "
                                      "with a request forked from it) and snapshot tables.", prefix.held),
            "kv_bytes_live": ("KV bytes the caches of the running requests and of the one being prefilled reference "
                              "(0 when none runs).",
                              engine.live_bytes),
            "kv_budget_bytes": ("The --kv-budget.", config.kv_budget),
            "queue_length": ("Requests waiting for the engine.", engine.queue_length),
            "queue_capacity": ("The --queue bound.", config.queue),
            "running_requests": ("Requests being decoded together (at most --max-batch).", engine.running_requests),
            "decode_steps": ("Joint decode steps run (one forward for every running request).", engine.steps),
            "decode_graph_replays": ("Joint decode steps replayed from a CUDA graph (GPU).",
                                     engine.graphs.replays if engine.graphs is not None else 0),
        }
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        guard(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict:
        guard(request)
        if name != config.model_id:
            raise APIError(404, f"model '{name}' is not served here (this server serves '{config.model_id}')",
                           code="model_not_found")
        return model_card()

    def tokenize(body, chat: bool) -> list[int]:
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions")
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as err:  # the template rejects the conversation (roles, order)
                raise APIError(400, f"the chat template rejected these messages: {err}") from None
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request: send a string (or a list of one)")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return tokenizer(prompt)["input_ids"]
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"token ids must lie in [0, {vocab})")
        return list(prompt)

    async def next_event(job: Job, request: Request, checked: list[float]) -> Event:
        """The job's next event; every POLL_S seconds (events flowing or not) checks the client is still there.
        `checked` holds the time of the last check, shared across calls for one request."""
        getter = asyncio.ensure_future(job.events.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=POLL_S)
                now = time.monotonic()
                if now - checked[0] >= POLL_S:
                    checked[0] = now
                    if await request.is_disconnected():
                        job.cancel()
                        raise ClientGone
                if done:
                    return getter.result()
        finally:
            getter.cancel()

    async def stream(job: Job, reply: Reply, include_usage: bool):
        try:
            if reply.chat:
                yield reply.chunk(first=True)
            while True:
                event = await job.events.get()
                if event.kind == "delta":
                    yield reply.chunk(event.text)
                elif event.kind == "done":
                    yield reply.chunk(finish_reason=event.finish_reason)
                    if include_usage:
                        yield reply.usage_chunk(event.usage.as_dict())
                    yield sse("[DONE]")
                    return
                elif event.kind == "error":
                    yield sse(APIError(event.status, event.message, kind="server_error").body())
                    return
        finally:
            job.cancel()  # a no-op once finished; stops the engine when the client went away mid-stream

    async def complete(request: Request, chat: bool) -> Response:
        caller = guard(request)
        body = parse_body(await read_body(request, config.max_body_bytes), ChatRequest if chat else CompletionRequest)
        if body.model != config.model_id:
            raise APIError(404, f"model '{body.model}' is not served here (this server serves '{config.model_id}')",
                           code="model_not_found")
        compressor = config.compressor
        if body.kvfold is not None and body.kvfold.method is not None:
            try:
                compressor = servable(Compressor.parse(body.kvfold.method))
            except KVFoldError as err:
                raise APIError(400, f"kvfold.method: {err}", code="invalid_method") from None
        stops = body.stops()
        ids = await run_in_threadpool(tokenize, body, chat)
        limit = engine.limit
        if not ids:
            raise APIError(400, "the prompt is empty")
        if len(ids) > (config.max_prompt_tokens or limit):
            raise APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit of "
                                f"{config.max_prompt_tokens or limit}: shorten it", code="context_length_exceeded")
        asked = (body.max_completion_tokens if chat else None) or body.max_tokens
        max_tokens = asked or min(config.default_max_tokens, limit - len(ids))
        if max_tokens < 1 or len(ids) + max_tokens > limit:
            raise APIError(400, f"{len(ids)} prompt tokens + max_tokens {max_tokens} exceed the model's context of "
                                f"{limit} tokens: shorten the prompt or lower max_tokens",
                           code="context_length_exceeded")
        needed = engine.kv_needed(len(ids) + max_tokens, compressor)
        if needed > config.kv_budget:
            raise APIError(503, f"this request may need up to {needed} bytes of KV cache, over the server's budget "
                                f"of {config.kv_budget} (--kv-budget): shorten it or lower max_tokens",
                           kind="server_error", code="kv_budget_exceeded")
        reply = Reply(chat, config.model_id)
        job = Job(GenerationRequest(reply.id, tuple(ids), compressor, max_tokens, body.temperature or 0.0,
                                    body.top_p if body.top_p is not None else 1.0, body.seed, stops),
                  asyncio.get_running_loop())
        try:
            engine.submit(job)
        except QueueFull:
            raise APIError(429, f"the server's queue is full ({config.queue} waiting): retry shortly",
                           kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        logger.info("request %s from %s: %d prompt tokens, max_tokens %d, %s%s", reply.id, caller[:20], len(ids),
                    max_tokens, compressor.spec, "" if not config.log_prompts else
                    f", prompt {tokenizer.decode(ids)!r}")
        try:
            checked = [time.monotonic()]
            first = await next_event(job, request, checked)
            if first.kind == "error":  # a 503 here is the moment's (budget full now, shutting down): retry later
                raise APIError(first.status, first.message, kind="server_error" if first.status >= 500 else
                               "invalid_request_error", headers={"Retry-After": "1"} if first.status == 503 else None)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(stream(job, reply, include_usage), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                         background=BackgroundTask(job.cancel))
            pieces = []
            while True:
                event = await next_event(job, request, checked)
                if event.kind == "delta":
                    pieces.append(event.text)
                elif event.kind == "done":
                    return JSONResponse(reply.final("".join(pieces), event.finish_reason, event.usage.as_dict()))
                elif event.kind == "error":
                    raise APIError(event.status, event.message, kind="server_error")
        except ClientGone:
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        except asyncio.CancelledError:  # the server is shutting down under this handler
            job.cancel()
            raise

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    return app
