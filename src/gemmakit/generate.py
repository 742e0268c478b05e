"""Token generation: prefill, the decode loop, stop conditions and UTF-8-safe text deltas.

``generate_events`` is a generator of :class:`StreamEvent`; the Python API, the CLI and the tests consume it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from .kv_cache import KVCache
from .model import Gemma
from .quant.linear import MAX_KERNEL_ROWS
from .errors import GemmakitError, InvalidParameterError
from .sampling import DrawSpec, SamplingParams, TokenHistory, TokenLogprob, pick_tokens, request_seed, token_logprob
from .structured.constraint import OutputRules
from .tokenizer import StreamDecoder, Tokenizer

PREFILL_CHUNK = 512
MAX_FORCED = 32  # forced tokens taken in a row (the engine's limit too, so both give the same tokens)


@dataclass
class StreamEvent:
    """One generated token.

    ``text`` is the new text this token completes (may be empty while a UTF-8 character or a possible stop
    string is pending, and may carry held-back text from earlier tokens). ``finish_reason`` is set on the last
    event: "stop" (stop token or stop string) or "length" (max_tokens or context full).
    """

    text: str
    token_id: int
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    # True when token_id is the end-of-turn / end-of-sequence token that ended generation (not content).
    stop_token: bool = False
    # On the first event of a request that asked for them (SamplingParams.prompt_logprobs): one entry per
    # prompt token, None for the first.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Chat answers, split as they stream (structured.output): the answer text, the thought text and the tool
    # calls (OpenAI's shape) this event completes. None on plain completions, where ``text`` is the answer.
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict] | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    """A finished generation: ``token_ids`` are the new tokens (stop tokens excluded)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # see StreamEvent.prompt_logprobs
    # Gemma 4 chat: the thought channel, kept apart from `text`, and parsed tool calls (OpenAI shape).
    reasoning: str | None = None
    tool_calls: list[dict] | None = None
    # With a JSON schema (response_format): the answer parsed (a dict, list, ..., or an instance of the pydantic
    # model given); None when the answer did not finish ("length") or is not JSON.
    parsed: Any = None


def partial_suffix_len(text: str, needles: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of one of ``needles``: text that must be
    held back because the next piece may complete a needle (for a few fixed needles; stop strings use
    :class:`StopStringMatcher`)."""
    best = 0
    for needle in needles:
        for k in range(min(len(needle) - 1, len(text)), 0, -1):
            if text.endswith(needle[:k]):
                best = max(best, k)
                break
    return best


class StopStringMatcher:
    """Holds back text that could be the start of a stop string and cuts the output at the first match.

    The stop strings go into one Aho-Corasick automaton (pyahocorasick), so a token's text is searched in one pass
    whatever their number; the text searched is the new text plus what was held back, shorter than the longest stop
    string: a token costs O(its text + the longest stop string), not O(stop strings).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.pending = ""
        self.longest = max((len(s) for s in self.stops), default=0)
        self.automaton = None
        if self.stops:
            import ahocorasick

            self.automaton = ahocorasick.Automaton()
            for stop in self.stops:
                self.automaton.add_word(stop, len(stop))
            self.automaton.make_automaton()

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit, whether a stop string was found)."""
        if self.automaton is None:
            return text, False
        self.pending += text
        cut = self._first_match(self.pending)
        if cut is not None:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = self._held_suffix(self.pending)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False

    def _first_match(self, text: str) -> int | None:
        """Where the earliest-starting stop string in ``text`` starts, or None."""
        first = None
        for end, length in self.automaton.iter(text):
            if first is not None and end - self.longest + 1 > first:
                break  # matches come by end position: none further on can start before `first`
            start = end - length + 1
            first = start if first is None else min(first, start)
        return first

    def _held_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper prefix of a stop string (the next piece may
        complete it)."""
        for k in range(min(self.longest - 1, len(text)), 0, -1):
            if self.automaton.match(text[-k:]):
                return k
        return 0

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class PromptScorer:
    """The log-probability of each prompt token given the ones before it, gathered as the prompt's hidden states
    come out of the model piece by piece (OpenAI's echo + logprobs, vLLM's prompt_logprobs)."""

    ROWS = 16  # hidden states per head call: bounds the logits held at once to ROWS x vocabulary

    def __init__(self, model: Gemma, prompt_ids: Sequence[int], n_top: int) -> None:
        self.model, self.ids, self.n_top = model, list(prompt_ids), n_top
        self.logprobs: list[TokenLogprob | None] = [None]  # the first token has no context

    def add(self, start: int, hidden: torch.Tensor) -> None:
        """Hidden states (T, E) of prompt positions start .. start + T - 1 (after the final norm)."""
        following = self.ids[start + 1 : start + 1 + hidden.shape[0]]  # the last prompt token predicts no prompt
        for s in range(0, len(following), self.ROWS):
            rows = hidden[s : min(s + self.ROWS, len(following))].unsqueeze(1)  # (r, 1, E): one-token rows
            logits = self.model.logits(rows)[:, 0]
            self.logprobs += [token_logprob(logits[i], following[s + i], self.n_top) for i in range(rows.shape[0])]


@torch.inference_mode()
def prefill(model: Gemma, ids: Sequence[int], cache: KVCache, chunk: int = PREFILL_CHUNK,
            scorer: PromptScorer | None = None) -> torch.Tensor:
    """Run the prompt through the model in chunks; returns the logits (V,) after its last token. A scorer
    gets every chunk's hidden states."""
    tokens = torch.tensor([list(ids)], dtype=torch.long)
    hidden = None
    for start in range(0, tokens.shape[1], chunk):
        piece = tokens[:, start : start + chunk]
        positions = torch.arange(start, start + piece.shape[1]).unsqueeze(0)
        n = piece.shape[1]
        if n <= MAX_KERNEL_ROWS and cache.batch_size == 1 and cache.takes_ragged(n):
            # A short piece goes as one-token rows of one sequence: the form in which the engine reads every
            # prompt, through the same kernels, so a short prompt gives the engine's numbers bit for bit (8-bit
            # decode x would turn the float noise between two attention paths into different tokens).
            hidden = model(piece.view(n, 1), positions.view(n, 1), cache, rows=torch.zeros(n, dtype=torch.long))
            hidden = hidden.view(1, n, -1)  # (n, 1, E) -> (1, n, E)
        else:
            hidden = model(piece, positions, cache)
        if scorer is not None:
            scorer.add(start, hidden[0])
    return model.logits(hidden[0, -1])


@torch.inference_mode()
def decode_step(model: Gemma, token: int, position: int, cache: KVCache) -> torch.Tensor:
    """One token in, next-token logits (V,) out."""
    hidden = model(torch.tensor([[token]]), torch.tensor([[position]]), cache)
    return model.logits(hidden[0, -1])


class SequenceSampler:
    """The per-sequence half of generation: sampling state, stop conditions and text deltas.

    Fed the next-token logits after each forward, :meth:`step` returns the :class:`StreamEvent` of the token
    it picked; the last event carries ``finish_reason``. Shared by the single-sequence loop below and the
    continuous-batching engine, so a request gives the same events either way.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                 stop_token_ids: Sequence[int], budget: int, vocab: int, rules: OutputRules | None = None) -> None:
        if any(t >= vocab for t in params.logit_bias):
            raise InvalidParameterError(f"logit_bias names token ids outside the vocabulary [0, {vocab}): "
                                        f"{sorted(t for t in params.logit_bias if t >= vocab)[:5]}")
        self.params = params
        self.budget = budget  # tokens this sequence may still add (max_tokens and the context both bound it)
        self.generated = 0
        self.seed = request_seed(params.seed)
        self.draws = 0  # picks made so far: the counter of the draw's random number
        self.history = TokenHistory(prompt_ids, params)
        self.decoder = StreamDecoder(tokenizer)
        self.stopper = StopStringMatcher(params.stop)
        self.stop_ids = set() if params.ignore_eos else set(stop_token_ids)
        self.finished = False
        # The output's grammar and thinking rules, with this sequence's own progress through them.
        # (A grammar that can take nothing more ends the sequence even with ignore_eos.)
        self.forced_left = False  # the last run of forced tokens was cut (see forced_tokens)
        self.constraint = (rules.constraint(tokenizer, sorted(self.stop_ids), vocab, sorted(stop_token_ids))
                           if rules is not None else None)

    def step(self, logits: torch.Tensor, bitmask_row: torch.Tensor | None = None) -> StreamEvent:
        """Pick the next token from (V,) float32 logits and turn it into an event (``bitmask_row``: the grammar's
        mask, when it was computed beside the forward). The engine does the same for a batch: :meth:`prepare`
        for each row, one :func:`pick_tokens` for all, then :meth:`take`."""
        plan = self.prepare(bitmask_row)
        if isinstance(plan, int):
            return self.take(plan, logits)
        (token,) = pick_tokens(logits.unsqueeze(0), [plan])
        if isinstance(token, GemmakitError):
            raise token
        return self.take(token, logits)

    def prepare(self, bitmask_row: torch.Tensor | None = None) -> int | DrawSpec:
        """What the next pick is: a token the grammar forces (taken without a draw), or the :class:`DrawSpec` of
        a draw (counted, so each draw of the sequence gets its own random number)."""
        allowed, banned = None, []
        if self.constraint is not None:
            # Forced tokens left at the head: with logprobs (taken one per step), or a run cut at its limit. Else
            # the caller took the whole run after the last sampled token, and there are none to look for.
            forced = (self.constraint.forced_tokens() if self.params.logprobs is not None or self.forced_left
                      else [])
            if forced:  # the grammar allows one continuation: taken without a draw, as the engine takes a run of
                return forced[0]  # them (so the draws, and the text, match with logprobs on)
            allowed, banned = self.constraint.allowed(bitmask_row), self.constraint.banned_now()
        self.draws += 1
        return DrawSpec(self.params, self.history, self.seed, self.draws - 1, allowed, list(banned))

    def forced_tokens(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens the grammar allows as the only continuation: the caller takes them without
        sampling (:meth:`take`) and runs them through the model together. None when logprobs are asked for: each
        forced token then comes from its own step, where its logprob is known (:meth:`step` takes it there, also
        without a draw, so the tokens are the same either way)."""
        if self.constraint is None or self.params.logprobs is not None:
            return []
        run = self.constraint.forced_tokens()
        taken = run[: min(limit, self.budget - self.generated)]
        self.forced_left = len(taken) < len(run)
        return taken

    def take(self, token: int, logits: torch.Tensor | None = None) -> StreamEvent:
        """The event of ``token`` as the next one (sampled from ``logits``, or forced by the grammar)."""
        params = self.params
        lp = token_logprob(logits, token, params.logprobs) if params.logprobs is not None and logits is not None \
            else None
        if self.constraint is not None:
            self.constraint.accept(token)
        self.generated += 1
        if token in self.stop_ids or (self.constraint is not None and token in self.constraint.end_ids):
            self.finished = True
            return StreamEvent(self.decoder.flush() + self.stopper.flush(), token, lp, "stop", stop_token=True)
        self.history.add(token)
        text, hit = self.stopper.feed(self.decoder.add(token))
        if hit:
            self.finished = True
            return StreamEvent(text, token, lp, "stop")
        if self.generated >= self.budget:
            self.finished = True
            return StreamEvent(text + self.stopper.feed(self.decoder.flush())[0] + self.stopper.flush(), token, lp,
                               "length")
        return StreamEvent(text, token, lp)


def token_budget(n_prompt: int, params: SamplingParams, max_len: int) -> int:
    """New tokens a sequence may add: max_tokens, bounded by what is left of the context."""
    budget = max_len - n_prompt
    return min(budget, params.max_tokens) if params.max_tokens is not None else budget


def generate_events(
    model: Gemma,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    stop_token_ids: Sequence[int],
    max_len: int,
    rules: OutputRules | None = None,
) -> Iterator[StreamEvent]:
    """Generate from ``prompt_ids`` until a stop condition; the caller checked that everything fits."""
    budget = token_budget(len(prompt_ids), params, max_len)
    cache = KVCache(model.config, 1, len(prompt_ids) + budget, dtype=model.activation_dtype,
                    ring_extra=MAX_KERNEL_ROWS)  # room for a short prompt read as one step (see prefill)
    sampler = SequenceSampler(tokenizer, prompt_ids, params, stop_token_ids, budget, model.config.vocab_size,
                              rules)
    scorer = PromptScorer(model, prompt_ids, params.prompt_logprobs) if params.prompt_logprobs is not None else None
    logits = prefill(model, prompt_ids, cache, scorer=scorer)
    position = len(prompt_ids)
    while True:
        event = sampler.step(logits)
        if scorer is not None:
            event.prompt_logprobs, scorer = scorer.logprobs, None
        yield event
        feed = [event.token_id]
        for forced in sampler.forced_tokens(MAX_FORCED) if not event.finish_reason else []:
            event = sampler.take(forced)  # as the engine does: forced tokens are not sampled
            yield event
            feed.append(forced)
            if event.finish_reason:
                break
        if event.finish_reason:
            return
        for token in feed:
            logits = decode_step(model, token, position, cache)
            position += 1


class CompletionBuilder:
    """Assembles a :class:`Completion` from the events of one generation, as they arrive."""

    def __init__(self, prompt_tokens: int, want_logprobs: bool) -> None:
        self.prompt_tokens, self.want_logprobs = prompt_tokens, want_logprobs
        self.start = time.perf_counter()
        self.first: float | None = None
        self.texts: list[str] = []
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish = "length"
        self.reasoning: list[str] = []
        self.tool_calls: list[dict] = []
        self.split = False  # the events carry a chat answer's split (content / reasoning / tool calls)

    def add(self, ev: StreamEvent) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        if ev.content is not None:
            self.split = True
            self.texts.append(ev.content)
            self.reasoning.append(ev.reasoning or "")
            self.tool_calls += ev.tool_calls or []
        else:
            self.texts.append(ev.text)
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        if not ev.stop_token:
            self.ids.append(ev.token_id)
            if ev.logprob is not None:
                self.logprobs.append(ev.logprob)
        if ev.finish_reason:
            self.finish = ev.finish_reason

    def build(self) -> Completion:
        end = time.perf_counter()
        timings = {"total_s": end - self.start, "first_token_s": (self.first or end) - self.start}
        completion = Completion("".join(self.texts), self.ids, self.finish, Usage(self.prompt_tokens, len(self.ids)),
                                self.logprobs if self.want_logprobs else None, timings,
                                prompt_logprobs=self.prompt_logprobs)
        if self.split:
            completion.reasoning = "".join(self.reasoning) or None
            completion.tool_calls = self.tool_calls or None
        return completion


def collect(events: Iterator[StreamEvent], prompt_tokens: int, want_logprobs: bool) -> Completion:
    """Run a stream to the end and assemble the :class:`Completion`."""
    builder = CompletionBuilder(prompt_tokens, want_logprobs)
    for ev in events:
        builder.add(ev)
    return builder.build()
