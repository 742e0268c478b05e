"""What every route shares: the served model and its engine (one :class:`ServerState` in ``app.state``), and
the steps of a generation request that both endpoints take (auth, model name, queueing, collecting)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..engine import Engine, EngineBusyError, RequestStream, RequestTimeoutError
from ..errors import ContextLengthError
from ..generate import Completion, CompletionBuilder
from ..batch.store import BatchStore
from ..safety import Safety
from ..safety.audit import AuditLog
from ..safety.stream import DEFAULT_WINDOW
from ..sampling import SamplingParams
from ..structured import OutputRules
from ..structured.output import ChatOutputSplitter
from .errors import APIError, ShuttingDownError
from .limits import ServerLimits
from .observability import Metrics


@dataclass
class ServerState:
    """The served model and how it is served (set once by create_app)."""

    llm: Any  # gemmakit.LLM
    engine: Engine
    metrics: Metrics
    model_id: str
    context_length: int  # tokens per sequence
    keys: list[bytes]  # accepted API keys; empty: no auth
    log_prompts: bool
    strict_model_name: bool
    limits: ServerLimits
    safety: Safety = field(default_factory=Safety)  # the policy's guards (by default: /v1/moderations only)
    audit: AuditLog | None = None  # the audit log (rows per request, user reports), when the server keeps one
    batches: BatchStore | None = None  # files and batch jobs (--data-dir); None: the batch API answers 501
    batch_worker: Any = None  # gemmakit.batch.worker.BatchWorker, running while the server does
    safety_window: int = DEFAULT_WINDOW  # characters of a streamed answer checked at a time (output guards)
    max_piece_bytes: int = 1  # see max_piece_bytes()
    draining: bool = False  # shutting down: no new generations (lifecycle.GracefulServer)


def server_state(request: Request) -> ServerState:
    return request.app.state.gemmakit


def max_piece_bytes(tokenizer) -> int:
    """The longest vocabulary piece, in bytes. No token stands for more bytes of text than its piece holds
    (SentencePiece's "▁" is 3 bytes for a 1-byte space; byte pieces are 6 for 1), so a text of B bytes needs at
    least B / max_piece_bytes tokens."""
    pieces = tokenizer.pieces
    lengths = getattr(pieces, "lengths", None)
    if lengths is not None:
        return int(lengths().max())
    return max(len(p.encode("utf-8", "replace")) for p in pieces)


def refuse_hopeless_prompt(state: ServerState, texts: list[str]) -> None:
    """ContextLengthError, before tokenizing, for texts too long to fit the context whatever their tokens: the
    tokenizer never spends its time on a prompt that is already known to fail."""
    n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    at_least = n_bytes // state.max_piece_bytes
    if at_least >= state.context_length:
        raise ContextLengthError(f"the prompt's {n_bytes} bytes of text make at least {at_least} tokens; the context "
                                 f"holds {state.context_length}")


async def off_loop(timeout: float | None, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a worker thread (work that grows with the input: rendering, tokenizing), within
    the request's ``timeout`` (RequestTimeoutError past it; the thread's result is then dropped)."""
    work = run_in_threadpool(fn, *args, **kwargs)
    try:
        return await asyncio.wait_for(work, timeout) if timeout is not None else await work
    except asyncio.TimeoutError:
        raise RequestTimeoutError(f"the request's timeout of {timeout:g} s passed while its prompt was being "
                                  "prepared") from None


def check_model(state: ServerState, name: str | None) -> None:
    if state.strict_model_name and name is not None and name != state.model_id:
        raise APIError(404, f"model {name!r} does not exist; this server serves {state.model_id!r}",
                       param="model", code="model_not_found")


def note(request: Request, **fields: Any) -> None:
    """Add fields to the request's log line."""
    if not hasattr(request.state, "log"):
        request.state.log = {}
    request.state.log.update(fields)


Job = tuple[list[int], SamplingParams, OutputRules | None]  # prompt ids, sampling, output rules


async def submit(state: ServerState, jobs: list[Job], timeout: float | None, priority: int = 0) -> list[RequestStream]:
    """Queue one engine request per choice (prompt ids, sampling, output rules); all or none (a full queue cancels the ones
    already queued). A worker thread does it: setting a request up grows with its input (stop strings). Should
    this handler be cancelled meanwhile, the requests are cancelled as soon as they exist (none is left running
    for nobody)."""
    if state.draining:
        raise ShuttingDownError("the server is shutting down and takes no new requests; retry on another one")
    loop = asyncio.get_running_loop()
    queued = loop.run_in_executor(None, _submit_all, state, jobs, timeout, loop, priority)
    try:
        return await asyncio.shield(queued)
    except asyncio.CancelledError:
        queued.add_done_callback(_cancel_streams)
        raise


def _cancel_streams(queued: asyncio.Future) -> None:
    if not queued.cancelled() and queued.exception() is None:
        for stream in queued.result():
            stream.cancel()


def _submit_all(state: ServerState, jobs: list[Job], timeout: float | None,
                loop: asyncio.AbstractEventLoop, priority: int = 0) -> list[RequestStream]:
    for ids, p, _ in jobs:
        state.llm.check_fits(len(ids), p, state.context_length)
    streams: list[RequestStream] = []
    try:
        for ids, p, rules in jobs:
            streams.append(state.engine.submit(ids, p, timeout, loop, rules, priority))
    except EngineBusyError:
        for st in streams:
            st.cancel()
        raise
    return streams


async def until_disconnected(request: Request) -> None:
    """Return when the client closes the connection. For a request whose body has been read, the next ASGI
    message is the server's http.disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
async def complete(state: ServerState, streams: list[RequestStream], prompt_lengths: list[int], want_logprobs: bool,
                   request: Request, splitter: Callable[[], ChatOutputSplitter] | None = None) -> list[Completion]:
    """Each choice's whole completion (a chat answer split by a fresh ``splitter()`` per choice, as streamed
    answers are). A client that hangs up first cancels its generations (their cache rows free at the engine's next
    step) and the request ends with 499, as a proxy logs it."""

    async def collect() -> list[Completion]:
        results = []
        for st, n_prompt in zip(streams, prompt_lengths):
            builder = CompletionBuilder(n_prompt, want_logprobs)
            split = splitter() if splitter is not None else None
            async for ev in state.metrics.observe(st, n_prompt):
                builder.add(split.split(ev) if split is not None else ev)
            results.append(builder.build())
        return results

    collecting = asyncio.ensure_future(collect())
    hangup = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait([collecting, hangup], return_when=asyncio.FIRST_COMPLETED)
        finished = collecting.done()
    finally:  # also when this handler itself is cancelled
        hangup.cancel()
        collecting.cancel()  # a no-op once it has finished
        for st in streams:
            st.cancel()
    if not finished:
        raise APIError(499, "the client closed the connection before the completion was ready", "client_closed_request")
    return collecting.result()


def usage(results: list[Completion], prompt: int) -> dict[str, int]:
    completion = sum(c.usage.completion_tokens for c in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
