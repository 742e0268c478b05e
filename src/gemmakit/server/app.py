"""The OpenAI-compatible HTTP API on FastAPI.

Handlers stay thin: they validate, build prompts through the :class:`~gemmakit.LLM` API and format OpenAI wire
objects. Generation runs one request at a time behind a bounded wait queue (a request past the queue gets 429
with Retry-After); a client that disconnects from a stream closes its generator, which ends its generation.
Continuous batching (issue 5) replaces the single slot later without changing the handlers.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, AsyncIterator, Iterator

import anyio

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import ContextLengthError, GemmakitError
from ..generate import Completion, StreamEvent
from ..sampling import TokenLogprob
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest

logger = logging.getLogger("gemmakit.server")


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


class Slot:
    """One generation at a time; at most `max_waiting` requests wait for it."""

    def __init__(self, max_waiting: int) -> None:
        self._run = threading.Lock()
        self._count = threading.Lock()
        self.waiting = 0
        self.max_waiting = max_waiting

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._count:
            if self.waiting >= self.max_waiting:
                raise APIError(429, f"server busy: {self.waiting} requests already waiting", "rate_limit_error",
                               headers={"Retry-After": "1"})
            self.waiting += 1
        try:
            self._run.acquire()
        finally:
            with self._count:
                self.waiting -= 1
        try:
            yield
        finally:
            self._run.release()


def _logprob_entry(tokenizer, lp: TokenLogprob, top: int) -> dict[str, Any]:
    def item(token_id: int, value: float) -> dict[str, Any]:
        raw = tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": value, "bytes": list(raw)}

    entry = item(lp.token_id, lp.logprob)
    entry["top_logprobs"] = [item(i, v) for i, v in lp.top[:top]]
    return entry


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


async def _guarded(events: Iterator[str], request: Request) -> AsyncIterator[str]:
    """Stream a synchronous SSE generator from a worker thread; stop and close it (ending its generation and
    releasing its slot) as soon as the client goes away."""
    try:
        while not await request.is_disconnected():
            item = await anyio.to_thread.run_sync(next, events, None)
            if item is None:
                break
            yield item
    finally:
        await anyio.to_thread.run_sync(events.close)


class Metrics:
    """Prometheus metrics of one server (its own registry, so several apps in a process do not collide)."""

    def __init__(self, slot: Slot) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("gemmakit_requests", "HTTP requests", ["path", "status"], registry=self.registry)
        self.prompt_tokens = Counter("gemmakit_prompt_tokens", "prompt tokens processed", registry=self.registry)
        self.generated_tokens = Counter("gemmakit_generated_tokens", "tokens generated", registry=self.registry)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("gemmakit_time_to_first_token_seconds", "time to first token", buckets=buckets,
                              registry=self.registry)
        self.itl = Histogram("gemmakit_inter_token_latency_seconds", "time between tokens", buckets=buckets,
                             registry=self.registry)
        self.running = Gauge("gemmakit_running_sequences", "sequences generating now", registry=self.registry)
        queue = Gauge("gemmakit_queue_depth", "requests waiting for a generation slot", registry=self.registry)
        queue.set_function(lambda: slot.waiting)

    def observe(self, events: Iterator[StreamEvent], prompt_tokens: int) -> Iterator[StreamEvent]:
        """Pass events through, recording latencies and token counts."""
        self.prompt_tokens.inc(prompt_tokens)
        self.running.inc()
        start = last = time.perf_counter()
        first = True
        try:
            for ev in events:
                now = time.perf_counter()
                (self.ttft if first else self.itl).observe(now - (start if first else last))
                first, last = False, now
                if not ev.stop_token:
                    self.generated_tokens.inc()
                yield ev
        finally:
            self.running.dec()


def create_app(llm, model_name: str | None = None, api_keys: list[str] | None = None,
               max_waiting: int = 64) -> FastAPI:
    """The FastAPI application serving ``llm`` under the model id ``model_name`` (default: the file's stem)."""
    model_id = model_name or llm.path.stem
    keys = [k.encode() for k in (api_keys or []) if k]
    slot = Slot(max_waiting)
    metrics = Metrics(slot)
    app = FastAPI(title="gemmakit", description="OpenAI-compatible API for Gemma models", version="0.1.0")

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
        if name is not None and name != model_id:
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

    @app.exception_handler(GemmakitError)
    async def _gemmakit_error(_: Request, exc: GemmakitError) -> JSONResponse:
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
        return _error(400, str(exc), "invalid_request_error", code=code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")  # the trace goes to the log, never to the client
        return _error(500, "internal server error", "server_error")

    @app.middleware("http")
    async def _log(request: Request, call_next):
        start = time.perf_counter()
        request_id = uuid.uuid4().hex[:12]
        response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        logger.info(json.dumps({"id": request_id, "method": request.method, "path": request.url.path,
                                "status": response.status_code,
                                "ms": round((time.perf_counter() - start) * 1000, 1)}))
        return response

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus_metrics():
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "gemmakit"}]}

    @app.post("/tokenize", dependencies=[Depends(authorize)])
    def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        if body.messages is not None:
            ids = llm.apply_chat_template(body.messages, tokenize=True)
        elif body.prompt is not None:
            ids = llm.tokenizer.encode(body.prompt, add_bos=body.add_special_tokens)
        else:
            raise APIError(400, "give 'prompt' or 'messages'", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": llm.context_length}

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

    def chat_params(body: ChatCompletionRequest, index: int) -> dict[str, Any]:
        params = body.sampling(body.max_completion_tokens or body.max_tokens)
        if body.seed is not None:
            params["seed"] = body.seed + index
        if body.logprobs:
            params["logprobs"] = body.top_logprobs or 0
        return params

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        n_prompt = len(llm.apply_chat_template(body.messages, tokenize=True, **chat_kwargs(body)))
        if body.max_tokens is None and body.max_completion_tokens is None:
            # OpenAI's default is "until the context is full"; fill what is left after the prompt.
            body.max_tokens = max(llm.context_length - n_prompt, 1)
        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        if body.stream:
            streams = [metrics.observe(llm.chat_stream(body.messages, **chat_kwargs(body), **chat_params(body, i)),
                                       n_prompt)
                       for i in range(body.n)]  # prompt and parameter errors surface here, before streaming
            return ClosingStreamingResponse(_guarded(chat_sse(body, streams, cid, created, n_prompt), request),
                                            media_type="text/event-stream")
        with slot.hold():
            metrics.running.inc()
            try:
                results = [llm.chat(body.messages, **chat_kwargs(body), **chat_params(body, i))
                           for i in range(body.n)]
            finally:
                metrics.running.dec()
        record(results)
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [chat_choice(body, i, c) for i, c in enumerate(results)],
                "usage": usage(results)}

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

    def record(results: list[Completion]) -> None:
        metrics.prompt_tokens.inc(results[0].usage.prompt_tokens)
        for c in results:
            metrics.generated_tokens.inc(c.usage.completion_tokens)
            metrics.ttft.observe(c.timings.get("first_token_s", 0.0))

    def usage(results: list[Completion]) -> dict[str, int]:
        prompt = results[0].usage.prompt_tokens
        completion = sum(c.usage.completion_tokens for c in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def chat_sse(body: ChatCompletionRequest, streams: list[Iterator[StreamEvent]], cid: str, created: int,
                 prompt_tokens: int):
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_id}
        completion_tokens = 0
        try:
            with slot.hold():
                for index, events in enumerate(streams):
                    yield sse({**base, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})
                    for ev in events:
                        if not ev.stop_token:
                            completion_tokens += 1
                        logprobs = None
                        if body.logprobs and ev.logprob is not None and not ev.stop_token:
                            logprobs = {"content": [_logprob_entry(llm.tokenizer, ev.logprob, body.top_logprobs or 0)]}
                        delta = {"content": ev.text} if ev.text else {}
                        if delta or logprobs or ev.finish_reason:
                            yield sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                                            "finish_reason": ev.finish_reason}]})
        except APIError as exc:
            yield sse({"error": {"message": exc.message, "type": exc.kind, "param": None, "code": exc.code}})
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                        "completion_tokens": completion_tokens,
                                                        "total_tokens": prompt_tokens + completion_tokens}})
        yield "data: [DONE]\n\n"

    # -- completions ------------------------------------------------------------------------------------

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
        prompt_text = body.prompt if isinstance(body.prompt, str) else llm.tokenizer.decode(body.prompt)

        def params(i: int) -> dict[str, Any]:
            p = body.sampling(body.max_tokens)
            if body.seed is not None:
                p["seed"] = body.seed + i
            if body.logprobs is not None:
                p["logprobs"] = body.logprobs
            return p

        if body.stream:
            n_prompt = len(llm._prompt_ids(body.prompt))
            streams = [metrics.observe(llm.stream(body.prompt, **params(i)), n_prompt) for i in range(body.n)]
            return ClosingStreamingResponse(_guarded(completion_sse(body, streams, cid, created, prompt_text,
                                                                    n_prompt), request),
                                     media_type="text/event-stream")
        with slot.hold():
            metrics.running.inc()
            try:
                results = [llm.generate(body.prompt, **params(i)) for i in range(body.n)]
            finally:
                metrics.running.dec()
        record(results)
        choices = []
        for i, c in enumerate(results):
            text = (prompt_text if body.echo else "") + c.text
            logprobs = None
            if body.logprobs is not None and c.logprobs is not None:
                tokens = [llm.tokenizer.token_bytes(lp.token_id).decode("utf-8", errors="replace") for lp in c.logprobs]
                logprobs = {
                    "tokens": tokens,
                    "token_logprobs": [lp.logprob for lp in c.logprobs],
                    "top_logprobs": [{llm.tokenizer.decode([t]): v for t, v in lp.top} for lp in c.logprobs],
                    "text_offset": [len(prompt_text if body.echo else "") + sum(len(t) for t in tokens[:k])
                                    for k in range(len(tokens))],
                }
            choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason})
        return {"id": cid, "object": "text_completion", "created": created, "model": model_id,
                "choices": choices, "usage": usage(results)}

    def completion_sse(body: CompletionRequest, streams, cid: str, created: int, prompt_text: str,
                       prompt_tokens: int):
        base = {"id": cid, "object": "text_completion", "created": created, "model": model_id}
        completion_tokens = 0
        try:
            with slot.hold():
                for index, events in enumerate(streams):
                    if body.echo:
                        yield sse({**base, "choices": [{"index": index, "text": prompt_text, "logprobs": None,
                                                        "finish_reason": None}]})
                    for ev in events:
                        if not ev.stop_token:
                            completion_tokens += 1
                        if ev.text or ev.finish_reason:
                            yield sse({**base, "choices": [{"index": index, "text": ev.text, "logprobs": None,
                                                            "finish_reason": ev.finish_reason}]})
        except APIError as exc:
            yield sse({"error": {"message": exc.message, "type": exc.kind, "param": None, "code": exc.code}})
        if body.stream_options and body.stream_options.include_usage:
            yield sse({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                        "completion_tokens": completion_tokens,
                                                        "total_tokens": prompt_tokens + completion_tokens}})
        yield "data: [DONE]\n\n"

    return app
