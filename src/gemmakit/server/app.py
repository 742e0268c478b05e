"""The OpenAI-compatible HTTP API on FastAPI.

Handlers stay thin: they validate, build prompts through the :class:`~gemmakit.LLM` API, submit them to the
continuous-batching :class:`~gemmakit.engine.Engine` and format OpenAI wire objects from its event streams
(read with ``async for``: no thread waits on a generation). A request past the engine's wait queue gets 429
with Retry-After; a client that disconnects cancels its sequences, whose cache rows free at the next step.
"""


from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..engine import Engine, EngineBusyError, RequestStream, RequestTimeoutError
from ..engine.engine import PREFILL_CHUNK
from ..errors import ContextLengthError, GemmakitError, InvalidParameterError
from ..generate import Completion, CompletionBuilder, StreamEvent
from ..kv_cache import KVCache
from ..quant.kernels import kernel_status
from ..sampling import SamplingParams, TokenLogprob
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .webui import add_chat_page

logger = logging.getLogger("gemmakit.server")

DEFAULT_CONTEXT = 8192  # tokens per sequence unless the server is told otherwise (bounded by the model's)
DEFAULT_KV_CACHE_BYTES = 1 << 30
MAX_CHOICES = 64  # engine requests one HTTP request may make (prompts x n)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _logprob_entry(tokenizer, lp: TokenLogprob, top: int) -> dict[str, Any]:
    def item(token_id: int, value: float) -> dict[str, Any]:
        raw = tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": value, "bytes": list(raw)}

    entry = item(lp.token_id, lp.logprob)
    entry["top_logprobs"] = [item(i, v) for i, v in lp.top[:top]]
    return entry


class CompletionLogprobs:
    """The logprobs object of a /v1/completions choice (tokens, token_logprobs, top_logprobs, text_offset),
    built token by token; ``text_offset`` counts characters of the choice's text from its start."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.entries: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.offset = 0

    def add(self, tokens: list[tuple[int, TokenLogprob | None]], silent_first: bool = False) -> dict[str, list]:
        """Append (token id, its logprob or None) pairs and return the entries for just these. ``silent_first``:
        the first token is not in the text (a BOS that encoding added)."""
        part: dict[str, list] = {key: [] for key in self.entries}
        for k, (token_id, lp) in enumerate(tokens):
            text = self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")
            part["tokens"].append(text)
            part["token_logprobs"].append(lp.logprob if lp is not None else None)
            part["top_logprobs"].append({self.tokenizer.decode([t]): v for t, v in lp.top} if lp is not None else None)
            part["text_offset"].append(self.offset)
            if not (silent_first and k == 0):
                self.offset += len(text)
        for key, values in part.items():
            self.entries[key] += values
        return part


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator: Starlette abandons it, unclosed, when the
    client disconnects, which would leave the generation (and its slot) suspended forever."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def _guarded(events: AsyncIterator[str], request: Request) -> AsyncIterator[str]:
    """Pass an SSE stream through; stop and close it (which cancels its generations, freeing their cache rows
    at the engine's next step) as soon as the client goes away."""
    next_check = 0.0
    try:
        async for item in events:
            # Starlette's own listener also ends the response on a disconnect; this check (a receive() under a
            # cancelled scope) runs at most every 50 ms rather than for every token.
            now = time.monotonic()
            if now >= next_check:
                if await request.is_disconnected():
                    break
                next_check = now + 0.05
            yield item
    finally:
        await events.aclose()


async def _until_disconnected(request: Request) -> None:
    """Return when the client closes the connection. For a request whose body has been read, the next ASGI
    message is the server's http.disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Metrics:
    """Prometheus metrics of one server (its own registry, so several apps in a process do not collide)."""

    def __init__(self, engine: Engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("gemmakit_requests", "HTTP requests", ["path", "status"], registry=self.registry)
        self.prompt_tokens = Counter("gemmakit_prompt_tokens", "prompt tokens processed", registry=self.registry)
        self.generated_tokens = Counter("gemmakit_generated_tokens", "tokens generated", registry=self.registry)
        self.cancelled = Counter("gemmakit_requests_cancelled", "generations the client stopped before they ended",
                                 registry=self.registry)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("gemmakit_time_to_first_token_seconds", "time to first token", buckets=buckets,
                              registry=self.registry)
        self.itl = Histogram("gemmakit_inter_token_latency_seconds", "time between tokens", buckets=buckets,
                             registry=self.registry)
        gauges = {
            "gemmakit_running_sequences": ("sequences holding a KV cache row", lambda: engine.running),
            "gemmakit_queue_depth": ("requests waiting for a KV cache row", lambda: engine.waiting),
            "gemmakit_kv_cache_usage_ratio": ("share of the KV cache tokens in use",
                                              lambda: engine.cache_tokens / engine.cache_capacity),
            "gemmakit_kv_cache_rows": ("KV cache rows (most sequences at once)", lambda: engine.max_batch),
        }
        for name, (doc, value) in gauges.items():
            Gauge(name, doc, registry=self.registry).set_function(value)

    async def observe(self, stream: RequestStream, prompt_tokens: int) -> AsyncIterator[StreamEvent]:
        """Pass a request's events through, recording latencies and token counts."""
        self.prompt_tokens.inc(prompt_tokens)
        start = last = time.perf_counter()
        first, finished = True, False
        try:
            async for ev in stream:
                now = time.perf_counter()
                (self.ttft if first else self.itl).observe(now - (start if first else last))
                first, last = False, now
                if not ev.stop_token:
                    self.generated_tokens.inc()
                finished = ev.finish_reason is not None
                yield ev
        except GemmakitError:
            finished = True  # ended by an error (reported to the client), not by the client
            raise
        finally:
            if not finished:
                self.cancelled.inc()
            stream.cancel()  # a no-op once finished; frees the row of an abandoned request


class RequestLog:
    """Pure ASGI middleware: counts each response in the metrics and logs one JSON line per request when its body
    (a whole stream, for SSE) has been sent. Unlike a BaseHTTPMiddleware it does not relay every stream chunk
    through an extra task and queue, which measurably slowed token streaming."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(scope["path"], str(status["code"])).inc()
            line = {"id": uuid.uuid4().hex[:12], "method": scope["method"], "path": scope["path"],
                    "status": status["code"], "ms": round((time.perf_counter() - start) * 1000, 1)}
            line.update(scope.get("state", {}).get("log", {}))
            logger.info(json.dumps(line, default=str))


def create_app(llm, model_name: str | None = None, api_keys: list[str] | None = None, max_waiting: int = 64,
               max_batch: int = 8, context_length: int | None = None,
               kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, log_prompts: bool = False,
               strict_model_name: bool = False) -> FastAPI:
    """The FastAPI application serving ``llm`` under the model id ``model_name`` (default: the file's stem).

    Args:
        max_batch: sequences generating at once (KV cache rows); at most engine.MAX_BATCH (64).
        max_waiting: requests queued for a row; past that, 429.
        context_length: tokens per sequence (default: the model's, at most 8192).
        kv_cache_bytes: memory for the KV cache; it bounds ``max_batch`` rows of ``context_length`` tokens.
        log_prompts: put prompt text in the request log (off: logs carry ids, counts and timings only).
        strict_model_name: refuse (404) requests that name another model; by default a server of one model
            answers whatever name a client was configured with, as Ollama and llama-server do.
    """
    model_id = model_name or llm.path.stem
    keys = [k.encode() for k in (api_keys or []) if k]
    ctx = min(llm.context_length, context_length or DEFAULT_CONTEXT)
    row = KVCache.row_bytes(llm.config, ctx, llm.model.activation_dtype, ring_extra=PREFILL_CHUNK)
    rows = min(max_batch, kv_cache_bytes // row)
    if rows < 1:
        raise InvalidParameterError(
            f"one sequence of {ctx} tokens needs {row / 2**20:.0f} MiB of KV cache, more than the budget of "
            f"{kv_cache_bytes / 2**20:.0f} MiB: lower the context length or raise the budget")
    if rows < max_batch:
        logger.warning("the KV cache budget of %.0f MiB holds %d rows of %d tokens (%.0f MiB each), fewer than "
                       "max_batch=%d: raise the budget or lower the context length to run more at once",
                       kv_cache_bytes / 2**20, rows, ctx, row / 2**20, max_batch)
    engine = Engine(llm.model, llm.tokenizer, llm.stop_token_ids, ctx, max_batch=rows, max_waiting=max_waiting)
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="gemmakit", description="OpenAI-compatible API for Gemma models", version="0.1.0",
                  lifespan=lifespan)
    app.state.engine = engine
    app.state.model_id = model_id

    def authorize(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].encode() if header.lower().startswith("bearer ") else b""
        # Compare against every key in constant time; never log the key.
        if not any(hmac.compare_digest(given, k) for k in keys):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           "authentication_error", code="invalid_api_key")

    def check_model(name: str | None) -> None:
        if strict_model_name and name is not None and name != model_id:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.kind, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {e.get('msg')}")
        return _error(400, "invalid request: " + "; ".join(problems), "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                      "invalid_request_error", headers=getattr(exc, "headers", None))

    @app.exception_handler(GemmakitError)
    async def _gemmakit_error(_: Request, exc: GemmakitError) -> JSONResponse:
        if isinstance(exc, EngineBusyError):
            return _error(429, str(exc), "rate_limit_error", headers={"Retry-After": "1"})
        if isinstance(exc, RequestTimeoutError):
            return _error(408, str(exc), "timeout_error", code="request_timeout")
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
        return _error(400, str(exc), "invalid_request_error", code=code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")  # the trace goes to the log, never to the client
        return _error(500, "internal server error", "server_error")

    app.add_middleware(RequestLog, metrics=metrics)
    add_chat_page(app)

    def note(request: Request, **fields: Any) -> None:
        """Add fields to the request's log line."""
        if not hasattr(request.state, "log"):
            request.state.log = {}
        request.state.log.update(fields)

    def submit(jobs: list[tuple[list[int], SamplingParams]], timeout: float | None) -> list[RequestStream]:
        """Queue one engine request per choice (prompt ids, sampling); all or none (a full queue cancels the
        ones already queued)."""
        for ids, p in jobs:
            llm.check_fits(len(ids), p, ctx)
        loop = asyncio.get_running_loop()
        streams: list[RequestStream] = []
        try:
            for ids, p in jobs:
                streams.append(engine.submit(ids, p, timeout, loop))
        except EngineBusyError:
            for st in streams:
                st.cancel()
            raise
        return streams

    async def complete(streams: list[RequestStream], prompt_lengths: list[int], want_logprobs: bool,
                       request: Request) -> list[Completion]:
        """Each choice's whole completion. A client that hangs up first cancels its generations (their cache
        rows free at the engine's next step) and the request ends with 499, as a proxy logs it."""

        async def collect() -> list[Completion]:
            results = []
            for st, n_prompt in zip(streams, prompt_lengths):
                builder = CompletionBuilder(n_prompt, want_logprobs)
                async for ev in metrics.observe(st, n_prompt):
                    builder.add(ev)
                results.append(builder.build())
            return results

        collecting = asyncio.ensure_future(collect())
        hangup = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait([collecting, hangup], return_when=asyncio.FIRST_COMPLETED)
            finished = collecting.done()
        finally:  # also when this handler itself is cancelled
            hangup.cancel()
            collecting.cancel()  # a no-op once it has finished
            for st in streams:
                st.cancel()
        if not finished:
            raise APIError(499, "the client closed the connection before the completion was ready",
                           "client_closed_request")
        return collecting.result()

    @app.get("/health")
    def health() -> dict[str, Any]:
        # Without the compiled kernels the server still answers, tens of times slower: say so where people look.
        return {"status": "ok", "auth": bool(keys), "kernels": kernel_status()}

    @app.get("/metrics")
    def prometheus_metrics():
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "gemmakit", "max_model_len": ctx}]}

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        if body.messages is not None:
            ids = llm.apply_chat_template(body.messages, tokenize=True)
        elif body.prompt is not None:
            ids = llm.tokenizer.encode(body.prompt, add_bos=body.add_special_tokens)
        else:
            raise APIError(400, "give 'prompt' or 'messages'", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": ctx}

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        vocab = llm.config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param="tokens")
        return {"prompt": llm.tokenizer.decode(body.tokens)}

    # -- chat -------------------------------------------------------------------------------------------

    def chat_kwargs(body: ChatCompletionRequest) -> dict[str, Any]:
        thinking = body.enable_thinking
        if thinking is None and body.chat_template_kwargs:
            thinking = bool(body.chat_template_kwargs.get("enable_thinking", False))
        return {"tools": body.tools, "enable_thinking": bool(thinking)}

    def chat_params(body: ChatCompletionRequest, index: int) -> SamplingParams:
        params = body.sampling(body.max_completion_tokens or body.max_tokens)
        if body.seed is not None:
            params["seed"] = body.seed + index
        if body.logprobs:
            params["logprobs"] = body.top_logprobs or 0
        return llm.sampling_params(**params)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        ids = llm.apply_chat_template(body.messages, tokenize=True, **chat_kwargs(body))
        n_prompt = len(ids)
        if body.max_tokens is None and body.max_completion_tokens is None:
            # OpenAI's default is "until the context is full"; fill what is left after the prompt.
            body.max_tokens = max(ctx - n_prompt, 1)
        note(request, prompt_tokens=n_prompt, n=body.n, **({"messages": body.messages} if log_prompts else {}))
        streams = submit([(ids, chat_params(body, i)) for i in range(body.n)], body.timeout)
        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        if body.stream:
            return ClosingStreamingResponse(_guarded(chat_sse(body, streams, cid, created, n_prompt, request),
                                                     request), media_type="text/event-stream")
        results = [llm.parse_chat(c) for c in await complete(streams, [n_prompt] * body.n, body.logprobs,
                                                              request)]
        note(request, completion_tokens=sum(c.usage.completion_tokens for c in results))
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [chat_choice(body, i, c) for i, c in enumerate(results)],
                "usage": usage(results, n_prompt)}

    def chat_choice(body: ChatCompletionRequest, index: int, c: Completion) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": c.text}
        finish = c.finish_reason
        if c.reasoning:
            message["reasoning_content"] = c.reasoning
        if c.tool_calls:
            message["tool_calls"] = c.tool_calls
            finish = "tool_calls"
        logprobs = None
        if body.logprobs and c.logprobs is not None:
            logprobs = {"content": [_logprob_entry(llm.tokenizer, lp, body.top_logprobs or 0) for lp in c.logprobs]}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}

    def usage(results: list[Completion], prompt: int) -> dict[str, int]:
        completion = sum(c.usage.completion_tokens for c in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def sse_error(exc: GemmakitError) -> str:
        kind, code = ("timeout_error", "request_timeout") if isinstance(exc, RequestTimeoutError) else (
            "server_error", None)
        return sse({"error": {"message": str(exc), "type": kind, "param": None, "code": code}})

    async def framed(body, streams: list[RequestStream], base: dict[str, Any], prompt_tokens: int,
                     request: Request, choice_chunks) -> AsyncIterator[str]:
        """The SSE frame both endpoints share: each choice's chunks in turn, an error event if generation
        fails, the usage chunk when asked, then [DONE]. The streams are cancelled whatever happens (a client
        that went away frees its rows) and the request's log line gets the token count."""
        count = {"completion_tokens": 0}
        try:
            for index, stream in enumerate(streams):
                async for chunk in choice_chunks(index, stream, count):
                    yield chunk
        except GemmakitError as exc:
            yield sse_error(exc)
        finally:
            for stream in streams:
                stream.cancel()
            note(request, **count)
        if body.stream_options and body.stream_options.include_usage:
            done = count["completion_tokens"]
            yield sse({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                                                        "total_tokens": prompt_tokens + done}})
        yield "data: [DONE]\n\n"

    def chat_sse(body: ChatCompletionRequest, streams: list[RequestStream], cid: str, created: int,
                 prompt_tokens: int, request: Request) -> AsyncIterator[str]:
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id}

        async def choice_chunks(index: int, stream: RequestStream, count: dict[str, int]) -> AsyncIterator[str]:
            yield sse({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
            async for ev in metrics.observe(stream, prompt_tokens):
                count["completion_tokens"] += not ev.stop_token
                logprobs = None
                if body.logprobs and ev.logprob is not None and not ev.stop_token:
                    logprobs = {"content": [_logprob_entry(llm.tokenizer, ev.logprob, body.top_logprobs or 0)]}
                delta = {"content": ev.text} if ev.text else {}
                if delta or logprobs or ev.finish_reason:
                    yield sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                                    "finish_reason": ev.finish_reason}]})

        return framed(body, streams, base, prompt_tokens, request, choice_chunks)

    # -- completions ------------------------------------------------------------------------------------

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
        prompts = body.prompt_list()
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} make {len(prompts) * body.n} choices; at most "
                           f"{MAX_CHOICES} per request", param="prompt")
        ids = [llm.prompt_ids(p) for p in prompts]
        texts = [p if isinstance(p, str) else llm.tokenizer.decode(p) for p in prompts]
        # The BOS that encoding a text prompt adds is not in the echoed text.
        added_bos = [isinstance(p, str) and x[:1] == [llm.tokenizer.bos_id] for p, x in zip(prompts, ids)]

        def params(choice: int) -> SamplingParams:
            p = body.sampling(body.max_tokens)
            if body.seed is not None:
                p["seed"] = body.seed + choice
            if body.logprobs is not None:
                p["logprobs"] = body.logprobs
                if body.echo:  # OpenAI's echo + logprobs scores the prompt's tokens too
                    p["prompt_logprobs"] = body.logprobs
            return llm.sampling_params(**p)

        note(request, prompt_tokens=sum(map(len, ids)), n=body.n,
             **({"prompt": texts if len(texts) > 1 else texts[0]} if log_prompts else {}))
        # Choices in OpenAI's order: each prompt's n choices in turn.
        prompt_of = [k // body.n for k in range(len(prompts) * body.n)]
        streams = submit([(ids[prompt_of[c]], params(c)) for c in range(len(prompt_of))], body.timeout)
        if body.stream:
            return ClosingStreamingResponse(_guarded(completion_sse(body, streams, cid, created, texts, ids,
                                                                    added_bos, request), request),
                                            media_type="text/event-stream")
        results = await complete(streams, [len(ids[k]) for k in prompt_of], body.logprobs is not None, request)
        note(request, completion_tokens=sum(c.usage.completion_tokens for c in results))
        choices = []
        for c, result in enumerate(results):
            k = prompt_of[c]
            text = (texts[k] if body.echo else "") + result.text
            logprobs = None
            if body.logprobs is not None and result.logprobs is not None:
                table = CompletionLogprobs(llm.tokenizer)
                if body.echo:
                    table.add(list(zip(ids[k], result.prompt_logprobs)), silent_first=added_bos[k])
                table.add([(lp.token_id, lp) for lp in result.logprobs])
                logprobs = table.entries
            choices.append({"index": c, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason})
        return {"id": cid, "object": "text_completion", "created": created, "model": model_id,
                "choices": choices, "usage": usage(results, sum(map(len, ids)))}

    def completion_sse(body: CompletionRequest, streams: list[RequestStream], cid: str, created: int,
                       texts: list[str], ids: list[list[int]], added_bos: list[bool],
                       request: Request) -> AsyncIterator[str]:
        base = {"id": cid, "object": "text_completion", "created": created, "model": model_id}

        def chunk(index: int, text: str, logprobs: dict[str, Any] | None, finish: str | None = None) -> str:
            return sse({**base, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                             "finish_reason": finish}]})

        async def choice_chunks(index: int, stream: RequestStream, count: dict[str, int]) -> AsyncIterator[str]:
            k = index // body.n
            table = CompletionLogprobs(llm.tokenizer) if body.logprobs is not None else None
            echo_pending = body.echo
            if echo_pending and table is None:
                yield chunk(index, texts[k], None)
                echo_pending = False
            async for ev in metrics.observe(stream, len(ids[k])):
                if echo_pending:  # the prompt's logprobs come with the first generated token
                    yield chunk(index, texts[k], table.add(list(zip(ids[k], ev.prompt_logprobs)),
                                                           silent_first=added_bos[k]))
                    echo_pending = False
                count["completion_tokens"] += not ev.stop_token
                logprobs = None
                if table is not None and ev.logprob is not None and not ev.stop_token:
                    logprobs = table.add([(ev.token_id, ev.logprob)])
                if ev.text or ev.finish_reason or logprobs:
                    yield chunk(index, ev.text, logprobs, ev.finish_reason)

        return framed(body, streams, base, sum(map(len, ids)), request, choice_chunks)

    return app
