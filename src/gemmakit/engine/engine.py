"""Continuous batching: one thread owns the model and steps every running sequence together.

Each engine step (1) admits waiting requests into free cache rows, (2) drops cancelled and expired ones, and
(3) runs one ragged forward over the next token of every decoding sequence plus the next prompt pieces of the
sequences still reading their prompts (up to ``prefill_budget`` tokens, at most ``prefill_chunk`` per sequence),
then samples a token for each sequence that decoded or finished its prompt, from one call of the head.

A sequence's arithmetic does not depend on its neighbours: in a ragged forward every token is a row of its own
(the matmul kernels compute each row the same way whatever the batch, see kernels/csrc; attention reads only the
token's own cache row; norms and activations are per row), so greedy output is the same alone or batched, and
does not depend on how a prompt was cut into pieces either.

Admission is bounded twice: ``max_batch`` cache rows (the KV memory) and ``max_waiting`` queued requests; past
the queue, :meth:`Engine.submit` raises :class:`EngineBusyError` (HTTP 429 in the server).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Sequence

import torch

from ..errors import GemmakitError, InvalidParameterError
from ..generate import MAX_FORCED, PromptScorer, SequenceSampler, StreamEvent, token_budget
from ..kernels import release_thread_workers
from ..kv_cache import KVCache
from ..sampling import DrawSpec, SamplingParams, pick_tokens
from ..structured import MaskBatch, OutputRules

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 128  # prompt tokens one sequence reads per step (and the spare slots of its sliding-window rings)
MIN_PREFIX = 16  # cached prompt tokens worth reusing (shorter prefixes are read again)
LOW_PRIORITY_SHARE = 8  # low-priority (batch) prompts read at most prefill_budget / this many tokens a step
MAX_BATCH = 64  # most cache rows


class EngineBusyError(GemmakitError):
    """The wait queue is full; retry later."""


class RequestTimeoutError(GemmakitError):
    """A request ran past its deadline and was stopped."""


class EngineStoppedError(GemmakitError):
    """The engine shut down before the request finished."""


@dataclass
class _Request:
    prompt: list[int]
    sampler: SequenceSampler
    deadline: float | None
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    loop: asyncio.AbstractEventLoop | None = None  # set when an async consumer reads the events
    async_events: asyncio.Queue | None = None
    row: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    feed: list[int] = field(default_factory=list)  # generated (sampled or forced), not yet run through the model
    cancelled: bool = False
    done: bool = False
    timeout: float | None = None
    scorer: PromptScorer | None = None  # prompt logprobs, when asked; handed over with the first event
    priority: int = 0  # 0: interactive; higher values wait (admission, prompt reading) while lower ones need the turn
    ran: list[int] = field(default_factory=list)  # generated tokens already run through the model (in the cache)

    @property
    def position(self) -> int:
        return len(self.prompt) + self.sampler.generated - len(self.feed)  # where feed[0] goes


def _as_gemmakit_error(exc: Exception) -> GemmakitError:
    return exc if isinstance(exc, GemmakitError) else GemmakitError(f"generation failed: {exc}")


def _delivered(item: StreamEvent | Exception) -> StreamEvent:
    """An event from the engine, or the error that ended the request, raised."""
    if isinstance(item, Exception):
        raise item
    return item


class RequestStream:
    """The events of one submitted request, readable from a thread (``for``) or a coroutine (``async for``).
    Closing it (or abandoning the iteration) cancels the request; its cache row is freed at the next step."""

    def __init__(self, engine: "Engine", request: _Request) -> None:
        self._engine, self._request = engine, request

    def __iter__(self) -> Iterator[StreamEvent]:
        try:
            while not (event := _delivered(self._request.events.get())).finish_reason:
                yield event
            yield event
        finally:
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        try:
            while not (event := _delivered(await self._request.async_events.get())).finish_reason:
                yield event
            yield event
        finally:
            self.cancel()

    def cancel(self) -> None:
        self._engine._cancel(self._request)


def _deliver(items: list[tuple[_Request, StreamEvent | Exception]]) -> None:
    """On a consumer's event loop: one step's events for the requests it serves, in order."""
    for request, item in items:
        request.async_events.put_nowait(item)


class Engine:
    """Serves generation requests for one model with continuous batching.

    Args:
        model, tokenizer: the loaded model (``llm.model``, ``llm.tokenizer``).
        stop_token_ids: ids that end a sequence (end of turn, end of text).
        context_length: most tokens (prompt + output) per sequence; each cache row holds this many.
        max_batch: cache rows, i.e. sequences running at once (at most MAX_BATCH).
        max_waiting: requests that may wait for a row; one more is refused with EngineBusyError.
        prefill_chunk: most prompt tokens one sequence reads in a step. Its sliding-window rings get this many
            spare slots (KVCache.begin), so size the memory with ``KVCache.row_bytes(..., ring_extra=...)``.
        prefill_budget: prompt tokens a step may read, over one or more sequences. Several short prompts
            arriving together are read in one step, and the running sequences wait at most about this many
            prompt tokens between their tokens.
    """

    def __init__(self, model, tokenizer, stop_token_ids: Sequence[int], context_length: int, max_batch: int = 8,
                 max_waiting: int = 64, prefill_chunk: int = PREFILL_CHUNK, prefill_budget: int = 256,
                 prefix_cache: bool = True) -> None:
        if not 1 <= max_batch <= MAX_BATCH:
            raise InvalidParameterError(f"max_batch={max_batch}: must be in [1, {MAX_BATCH}]")
        if not 1 <= prefill_chunk <= prefill_budget:
            raise InvalidParameterError(f"prefill_chunk={prefill_chunk}, prefill_budget={prefill_budget}: need "
                                        "1 <= prefill_chunk <= prefill_budget")
        self.model, self.tokenizer = model, tokenizer
        self.stop_token_ids = list(stop_token_ids)
        self.context_length = context_length
        self.max_batch, self.max_waiting, self.prefill_chunk = max_batch, max_waiting, prefill_chunk
        self.prefill_budget = prefill_budget
        self.cache = KVCache(model.config, max_batch, context_length, dtype=model.activation_dtype,
                             ring_extra=prefill_chunk)
        self._rows: list[_Request | None] = [None] * max_batch
        self._waiting: deque[_Request] = deque()
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Request, StreamEvent | Exception]]] = {}
        self._wake = threading.Condition()
        self._stopped = False
        self.steps = 0
        self.peak_batch = 0  # most sequences decoded in one step so far
        self._masks: MaskBatch | None = None  # made for the first constrained request
        # Prefix caching: a freed row keeps its tokens' keys and values until the row is taken again; a new prompt
        # that starts with them reads only the rest (see _pick_row).
        self.prefix_cache = prefix_cache
        self._retained: list[list[int] | None] = [None] * max_batch  # token ids whose keys a free row still holds
        self._freed_at = [0] * max_batch  # when each row was freed (steps): the least recently used goes first
        self.prefix_stats = {"queries": 0, "hits": 0, "hit_tokens": 0, "evictions": 0}
        self._ring_slots = min((s.slots for s in self.cache._slots.values() if s.ring), default=None)
        # Zeroing the cache ran in parallel on this thread: its idle workers would make the engine thread's own
        # workers sleep between parallel regions (see kernels.release_thread_workers).
        release_thread_workers()
        self._thread = threading.Thread(target=self._run, name="gemmakit-engine", daemon=True)
        self._thread.start()

    # -- the API side (any thread) ----------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    @property
    def cache_tokens(self) -> int:
        """Tokens held in the KV cache rows now."""
        return sum(min(r.prefilled + r.sampler.generated, self.context_length) for r in self._rows if r is not None)

    @property
    def cache_capacity(self) -> int:
        return self.max_batch * self.context_length

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running and taking requests (a health check's question)."""
        return self._thread.is_alive() and not self._stopped

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, timeout: float | None = None,
               loop: asyncio.AbstractEventLoop | None = None, rules: OutputRules | None = None,
               priority: int = 0) -> RequestStream:
        """Queue a request (its prompt must fit the context: the caller checks) and return its event stream.
        Pass the running event loop as ``loop`` to read the stream with ``async for``, and ``rules`` to hold the
        output to a grammar (see :mod:`gemmakit.structured`). ``priority`` above 0 (batch work) lets requests of
        lower priority be admitted first and read their prompts alone; its own decode steps go on meanwhile.

        Raises:
            EngineBusyError: ``max_waiting`` requests are already waiting.
        """
        budget = token_budget(len(prompt_ids), params, self.context_length)
        sampler = SequenceSampler(self.tokenizer, prompt_ids, params, self.stop_token_ids, budget,
                                  self.model.config.vocab_size, rules)
        deadline = time.monotonic() + timeout if timeout is not None else None
        request = _Request(list(prompt_ids), sampler, deadline, timeout=timeout, priority=priority)
        if params.prompt_logprobs is not None:
            request.scorer = PromptScorer(self.model, prompt_ids, params.prompt_logprobs)
        if loop is not None:
            request.loop, request.async_events = loop, asyncio.Queue()
        with self._wake:
            if self._stopped:
                raise EngineStoppedError("the engine has shut down")
            if len(self._waiting) >= self.max_waiting:
                raise EngineBusyError(f"server busy: {len(self._waiting)} requests already waiting")
            self._waiting.append(request)
            self._wake.notify()
        return RequestStream(self, request)

    def _cancel(self, request: _Request) -> None:
        with self._wake:
            request.cancelled = True
            self._wake.notify()

    def shutdown(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)
        if self._masks is not None:
            self._masks.close()

    # -- the engine thread ------------------------------------------------------------------------------

    def _emit(self, request: _Request, item: StreamEvent | Exception) -> None:
        if request.loop is None:
            request.events.put(item)
            return
        # Held until the end of the step, then handed to each event loop in one call: one wake-up of the
        # server's loop per step instead of one per sequence.
        self._outbox.setdefault(request.loop, []).append((request, item))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumer's event loop has closed (server shutting down): nobody to tell
                for request, _ in items:
                    request.cancelled = True

    def _free(self, request: _Request) -> None:
        request.done = True
        if request.row is not None and self._rows[request.row] is request:
            self._rows[request.row] = None
            if self.prefix_cache:
                self._retained[request.row] = request.prompt[: request.prefilled] + request.ran
                self._freed_at[request.row] = self.steps

    def _admit(self) -> None:
        if any(r.priority for r in self._waiting):  # the most urgent first, in arrival order within a priority
            self._waiting = deque(sorted(self._waiting, key=lambda r: r.priority))
        while self._waiting and None in self._rows:
            request = self._waiting.popleft()
            if request.cancelled:
                continue
            row, reused, source = self._pick_row(request)
            if source is not None or not reused:  # what the row kept gives way
                self._count_eviction(row)
            if source is not None:  # the prefix is in a running sequence's row: copy it over
                self.cache.copy_row(source, slice(row, row + 1))
            if reused:
                self.cache.keep_prefix(row, reused)
                request.prefilled = reused
                self.prefix_stats["hits"] += 1
                self.prefix_stats["hit_tokens"] += reused
            else:
                self.cache.reset(torch.tensor([row]))
            self._retained[row] = None
            request.row = row
            self._rows[row] = request

    def _count_eviction(self, row: int) -> None:
        """Count the prefix a row held (if one worth reusing) as evicted."""
        kept = self._retained[row]
        self.prefix_stats["evictions"] += bool(kept and len(kept) >= MIN_PREFIX)

    def _pick_row(self, request: _Request) -> tuple[int, int, int | None]:
        """The free row for ``request``, how many of its prompt tokens will be there already, and the running row to
        copy them from (None: the free row holds them itself, or nothing is reused). The longest prefix wins (at
        least MIN_PREFIX, and always one token short of the whole prompt, whose last position must run to give the
        next token's logits); a free row that holds it is taken as it is, a running row's is copied into an empty
        (else the least recently freed) row. A prompt whose logprobs are asked for reads every token."""
        free = [i for i, r in enumerate(self._rows) if r is None]
        empty = [i for i in free if not self._retained[i]]
        spare = empty[0] if empty else min(free, key=lambda i: self._freed_at[i])
        if not self.prefix_cache:
            return spare, 0, None
        self.prefix_stats["queries"] += 1
        if request.scorer is not None:
            return spare, 0, None
        kept = [(self._usable(self._retained[i], request.prompt), 1, i) for i in free]
        kept += [(self._usable(r.prompt[: r.prefilled] + r.ran, request.prompt), 0, i)
                 for i, r in enumerate(self._rows) if r is not None and not r.done]
        length, in_free_row, row = max(kept, default=(0, 0, 0))  # on a tie, a free row: nothing to copy
        if length < MIN_PREFIX:
            return spare, 0, None
        return (row, length, None) if in_free_row else (spare, length, row)

    def _usable(self, kept: list[int] | None, prompt: list[int]) -> int:
        """Prompt tokens a row holding ``kept`` can spare reading. A sliding-window ring holds only its last slots:
        the prefix's last window must still be there, so the old sequence may have gone at most ring_extra
        tokens past it."""
        if not kept:
            return 0
        n = 0
        for a, b in zip(kept, prompt[:-1]):
            if a != b:
                break
            n += 1
        if self._ring_slots is not None and len(kept) > self._ring_slots and len(kept) - n > self.cache.ring_extra:
            return 0
        return n

    def _drop_finished(self) -> None:
        now = time.monotonic()
        for request in list(self._rows) + list(self._waiting):
            if request is None or request.done:
                continue
            if request.cancelled:
                self._free(request)
            elif request.deadline is not None and now > request.deadline:
                self._emit(request, RequestTimeoutError(
                    f"request stopped at its deadline of {request.timeout:g} s, after "
                    f"{request.sampler.generated} generated tokens"))
                self._free(request)
        self._waiting = deque(r for r in self._waiting if not r.done)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        # Inference mode for the whole loop: the cache may have been made under the caller's inference mode,
        # and admission writes to it too.
        with torch.inference_mode():
            while self._iterate():
                pass
        for request in [r for r in self._rows if r is not None] + list(self._waiting):
            self._emit(request, EngineStoppedError("the engine has shut down"))
        self._flush()

    def _iterate(self) -> bool:
        """One turn of the loop: admit, then step. False once the engine is stopped."""
        self._flush()
        try:
            with self._wake:
                if self._stopped:
                    return False
                self._drop_finished()
                self._admit()
                if not any(self._rows):
                    self._flush()
                    self._wake.wait(timeout=1.0)
                    return True
            self._step()
        except Exception as exc:  # a failure ends the running sequences with an error, never the engine
            logger.exception("engine step failed")
            for request in self._rows:
                if request is not None:
                    self._emit(request, _as_gemmakit_error(exc))
                    self._free(request)
            self._retained = [None] * self.max_batch  # a step that failed may have written half its keys
        return True

    def _step(self) -> None:
        self.steps += 1
        tokens: list[int] = []
        rows: list[int] = []
        positions: list[int] = []
        sampled: list[tuple[_Request, int]] = []  # sequences that get a token now, with their last token's index
        fed: list[tuple[_Request, list[int]]] = []  # decode tokens, kept as cached once the forward has run
        for request in self._rows:  # the next token of every decoding sequence
            if request is not None and request.feed and not request.done:
                # Its last token, after the tokens a grammar forced (a short piece, read like a prompt's)
                start = request.position
                tokens.extend(request.feed)
                rows.extend([request.row] * len(request.feed))
                positions.extend(range(start, start + len(request.feed)))
                sampled.append((request, len(tokens) - 1))
                fed.append((request, request.feed))
                request.feed = []
        self.peak_batch = max(self.peak_batch, len(tokens))
        turns = self._prompt_turns()
        # Low-priority prompts read in smaller pieces: an interactive request that arrives meanwhile waits for a
        # shorter step before its own.
        budget = self.prefill_budget
        if turns and turns[0].priority > 0:
            budget //= LOW_PRIORITY_SHARE
        scored: list[tuple[_Request, int, slice]] = []  # prompt pieces to score: first position, their rows
        for request in turns:  # then prompt pieces, while the step's budget lasts
            if budget <= 0:
                break
            start = request.prefilled
            piece = request.prompt[start : start + min(self.prefill_chunk, budget)]
            if request.scorer is not None:
                scored.append((request, start, slice(len(tokens), len(tokens) + len(piece))))
            tokens.extend(piece)
            rows.extend([request.row] * len(piece))
            positions.extend(range(start, start + len(piece)))
            request.prefilled += len(piece)
            budget -= len(piece)
            if request.prefilled == len(request.prompt):
                sampled.append((request, len(tokens) - 1))
        if not tokens:
            return
        masks = self._start_masks([r for r, _ in sampled])  # beside the forward, on llguidance's threads
        hidden = self.model(torch.tensor(tokens).unsqueeze(1), torch.tensor(positions).unsqueeze(1), self.cache,
                            rows=torch.tensor(rows))  # (N, 1, E)
        for request, ran in fed:
            request.ran.extend(ran)
        for request, start, piece_rows in scored:
            request.scorer.add(start, hidden[piece_rows, 0])
        if sampled:
            last = torch.tensor([i for _, i in sampled])
            # (n, 1, E): one-token rows, which the head computes one by one whatever their number (kernel_rows)
            self._accept_all([r for r, _ in sampled], self.model.logits(hidden[last])[:, 0], masks())

    def _prompt_turns(self) -> list[_Request]:
        """The sequences with prompt left to read, in the order they share a step's prompt budget: lowest row first,
        and only those of the most urgent priority that has any (a batch's long prompts wait while an interactive
        request reads its own, so its first token comes as soon as when the server is idle)."""
        reading = [r for r in self._rows if r is not None and not r.done and r.prefilled < len(r.prompt)]
        if not reading:
            return reading
        urgent = min(r.priority for r in reading)
        return [r for r in reading if r.priority == urgent]

    def _start_masks(self, requests: list[_Request]) -> Callable[[], dict[int, torch.Tensor]]:
        """Start computing the grammar masks of the constrained requests among ``requests``; returns a function
        that waits for them and gives each one's mask row by id(request). Unconstrained requests cost nothing."""
        constrained = [r for r in requests if r.sampler.constraint is not None
                       and r.sampler.constraint.grammar_mask_needed]
        if not constrained:
            return dict
        if self._masks is None:
            self._masks = MaskBatch(self.model.config.vocab_size)
        future, bitmask = self._masks.start([r.sampler.constraint for r in constrained])

        def wait() -> dict[int, torch.Tensor]:
            future.result()
            return {id(r): bitmask[i] for i, r in enumerate(constrained)}

        return wait

    def _accept_all(self, requests: list[_Request], logits: torch.Tensor,
                    masks: dict[int, torch.Tensor] | None = None) -> None:
        """Pick each request's next token from its row of (len(requests), V) logits (``masks``: the grammar
        masks of the constrained ones, by id(request)): forced tokens are taken as they are, every other row is
        drawn in one C call (rows in parallel), greedy ones included."""
        masks = masks or {}
        plans: list[int | DrawSpec | Exception] = []
        for request in requests:
            try:
                plans.append(request.sampler.prepare(masks.get(id(request))))
            except Exception as exc:  # e.g. a grammar that broke: this sequence only
                plans.append(exc)
        drawn = [i for i, plan in enumerate(plans) if isinstance(plan, DrawSpec)]
        picks = dict(zip(drawn, pick_tokens(logits[drawn] if len(drawn) < len(requests) else logits,
                                            [plans[i] for i in drawn])))
        for i, request in enumerate(requests):
            token = picks.get(i, plans[i])
            try:
                if isinstance(token, Exception):
                    raise token
                self._accept(request, logits[i], token)
            except Exception as exc:  # one sequence's sampling failure ends that sequence, not the batch
                logger.warning("sampling failed for one sequence: %s", exc)
                self._emit(request, _as_gemmakit_error(exc))
                self._free(request)

    def _accept(self, request: _Request, logits: torch.Tensor, token: int) -> None:
        event = request.sampler.take(token, logits)
        if request.scorer is not None:  # the prompt is done: its logprobs go with the first token
            event.prompt_logprobs, request.scorer = request.scorer.logprobs, None
        self._emit(request, event)
        request.feed = [event.token_id]
        for forced in request.sampler.forced_tokens(MAX_FORCED) if not event.finish_reason else []:
            event = request.sampler.take(forced)  # the grammar allows nothing else: no sampling
            self._emit(request, event)
            request.feed.append(forced)
            if event.finish_reason:
                break
        if event.finish_reason:
            self._free(request)
