"""The OpenAI-compatible HTTP API on FastAPI: :func:`create_app` puts the pieces together.

Handlers (``routes/``) stay thin: they validate, build prompts through the :class:`~gemmakit.LLM` API, submit them
to the continuous-batching :class:`~gemmakit.engine.Engine` and format OpenAI wire objects from its event streams
(read with ``async for``: no thread waits on a generation). A request past the engine's wait queue gets 429 with
Retry-After; a client that disconnects cancels its sequences, whose cache rows free at the next step.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from ..batch.store import BatchStore
from ..batch.worker import BatchWorker
from ..engine import Engine
from ..engine.engine import PREFILL_CHUNK
from ..errors import InvalidParameterError
from ..kv_cache import KVCache
from ..safety import Safety, SafetyPolicy
from ..safety.audit import AuditLog
from ..safety.stream import DEFAULT_WINDOW
from ..structured.vocab import ll_tokenizer
from .audit import AuditTrail
from .auth import AuthGate
from .errors import CatchAll, install_error_handlers
from .limits import ServerLimits, SizeGate
from .observability import Metrics, RequestLog
from .routes import ROUTERS
from .state import ServerState, max_piece_bytes
from .webui import add_chat_page

logger = logging.getLogger("gemmakit.server")

DEFAULT_CONTEXT = 8192  # tokens per sequence unless the server is told otherwise (bounded by the model's)
DEFAULT_KV_CACHE_BYTES = 1 << 30


def cache_rows(llm, ctx: int, max_batch: int, kv_cache_bytes: int) -> int:
    """KV cache rows of ``ctx`` tokens that fit the budget, at most ``max_batch`` (a warning when fewer)."""
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
    return rows


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """Start the batch worker (with a data directory); at the end stop it, the engine, and the SQLite files."""
    state: ServerState = app.state.gemmakit
    if state.batch_worker is not None:
        state.batch_worker.start()
    yield
    if state.batch_worker is not None:
        await state.batch_worker.stop()
    state.engine.shutdown()
    for closing in (state.audit, state.batches):
        if closing is not None:
            closing.close()


def _add_middleware(app: FastAPI, state: ServerState, public_docs_and_metrics: bool) -> None:
    """Outermost first: the request log (sees every answer), the key check (401 from the headers: a client without
    a key learns nothing, limits included), the size gate (413/431 before a byte of body is read), the audit trail
    (a request's row is committed before its response ends), the catch-all (a bug is a 500 that keeps the
    connection). The last added is the outermost."""
    app.add_middleware(CatchAll)
    app.add_middleware(AuditTrail, log=state.audit, model_id=state.model_id)
    app.add_middleware(SizeGate, limits=state.limits)
    app.add_middleware(AuthGate, keys=state.keys, public_docs_and_metrics=public_docs_and_metrics)
    app.add_middleware(RequestLog, metrics=state.metrics)


def _engine_for(llm, ctx: int, max_batch: int, kv_cache_bytes: int, max_waiting: int, prefix_cache: bool) -> Engine:
    """The continuous-batching engine over ``llm``: sequences of ``ctx`` tokens, as many rows of them (up to
    ``max_batch``) as ``kv_cache_bytes`` holds."""
    rows = cache_rows(llm, ctx, max_batch, kv_cache_bytes)
    return Engine(llm.model, llm.tokenizer, llm.stop_token_ids, ctx, max_batch=rows, max_waiting=max_waiting,
                  prefix_cache=prefix_cache)


def create_app(llm, model_name: str | None = None, api_keys: list[str] | None = None, max_waiting: int = 64,
               max_batch: int = 8, context_length: int | None = None,
               kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, log_prompts: bool = False,
               strict_model_name: bool = False, public_docs_and_metrics: bool = False,
               limits: ServerLimits | None = None, safety: Safety | SafetyPolicy | None = None,
               safety_window: int = DEFAULT_WINDOW, audit: AuditLog | None = None,
               prebuild_grammar_vocab: bool = True, data_dir: str | Path | None = None,
               prefix_cache: bool = True) -> FastAPI:
    """The FastAPI application serving ``llm`` under the model id ``model_name`` (default: the file's stem).

    Args:
        max_batch: sequences generating at once (KV cache rows); at most engine.MAX_BATCH (64).
        max_waiting: requests queued for a row; past that, 429.
        context_length: tokens per sequence (default: the model's, at most 8192).
        kv_cache_bytes: memory for the KV cache; it bounds ``max_batch`` rows of ``context_length`` tokens.
        log_prompts: put prompt text in the request log (off: logs carry ids, counts and timings only).
        strict_model_name: refuse (404) requests that name another model; by default a server of one model
            answers whatever name a client was configured with, as Ollama and llama-server do.
        public_docs_and_metrics: with API keys set, leave /metrics, /docs, /redoc and /openapi.json open (by
            default they need a key like the API; /health and the chat page's files are always open).
        limits: what one request may carry (body and header bytes, messages, stop strings, n, ...); see
            :class:`~gemmakit.server.limits.ServerLimits` for the defaults.
        safety: the safety policy (or a :class:`~gemmakit.safety.Safety` built from one): guards on input and output
            and what a flag does. By default no guard runs on generation; ``/v1/moderations`` runs the built-in ones.
        safety_window: characters of a streamed answer the output guards check at a time (see
            :mod:`gemmakit.safety.stream`).
        audit: the audit log: a row per generation and moderation request, written before the response ends, and
            the reports of ``POST /v1/feedback`` (without it, feedback answers 501).
        prebuild_grammar_vocab: build the grammar library's view of the vocabulary now (~5 s for 262k pieces)
            rather than in the first request with a response_format or tools (a batch job without them skips it).
        data_dir: where ``/v1/files`` and ``/v1/batches`` keep files and jobs (SQLite); batches run at low priority
            in this server's engine and resume after a restart. Without it those routes answer 501.
        prefix_cache: a new prompt that starts with the tokens a free KV cache row still holds (a conversation's
            earlier turns, a shared instruction) reads only the rest (see gemmakit.engine.Engine).
    """
    if safety_window < 1:
        raise InvalidParameterError(f"safety_window is at least 1 character, not {safety_window}")
    safety = safety if isinstance(safety, Safety) else Safety(safety)
    safety.warm_up()  # the guards that run on generation load now, not in the first request
    ctx = min(llm.context_length, context_length or DEFAULT_CONTEXT)
    engine = _engine_for(llm, ctx, max_batch, kv_cache_bytes, max_waiting, prefix_cache)
    metrics = Metrics(engine)
    if prebuild_grammar_vocab:
        ll_tokenizer(llm.tokenizer)

    store = BatchStore(data_dir) if data_dir is not None else None
    app = FastAPI(title="gemmakit", description="OpenAI-compatible API for Gemma models", version="0.1.0",
                  lifespan=_lifespan)
    app.state.gemmakit = ServerState(llm=llm, engine=engine, metrics=metrics, model_id=model_name or llm.path.stem,
                                     context_length=ctx, keys=[k.encode() for k in (api_keys or []) if k],
                                     log_prompts=log_prompts, strict_model_name=strict_model_name,
                                     limits=limits or ServerLimits(), max_piece_bytes=max_piece_bytes(llm.tokenizer),
                                     safety=safety, safety_window=safety_window, audit=audit, batches=store)
    if store is not None:
        keys = app.state.gemmakit.keys
        app.state.gemmakit.batch_worker = BatchWorker(app, store, engine, keys[0] if keys else None)
    app.state.engine = engine
    app.state.model_id = app.state.gemmakit.model_id
    install_error_handlers(app)
    _add_middleware(app, app.state.gemmakit, public_docs_and_metrics)
    for router in ROUTERS:
        app.include_router(router)
    add_chat_page(app)
    return app
