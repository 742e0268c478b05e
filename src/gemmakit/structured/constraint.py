"""Holding one sequence's output to a grammar while it decodes, token by token.

:class:`OutputRules` says what a request's output must do (a grammar, from the first token or from a trigger
token on; a thought channel that runs free before it, with a budget; tokens never allowed). Each sequence gets
its own :class:`OutputConstraint` from them: before a token is sampled it says which tokens are allowed (a
bitmask llguidance fills, without the GIL, while the forward runs: :class:`MaskBatch`), and after it is sampled
it moves on with it.

States of a sequence:

- ``start``: the first token. The grammar's first tokens are allowed, and the thought channel's opening token
  when thinking may come first.
- ``thought``: inside the thought channel: free, until its closing token (forced once the budget is spent).
- ``free``: unconstrained text, waiting for the trigger token (tool calls with ``tool_choice: auto``); without a
  trigger, free to the end (a request whose only rule is a thinking budget).
- ``grammar``: every token is held to the grammar; once the grammar is complete the stop tokens are allowed, and
  once it can take nothing more only they are (or, with a trigger, the sequence is free again).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import GemmakitError
from .grammars import Grammar


def _set_bits(bits: torch.Tensor, ids: Sequence[int]) -> None:
    """Set the bits of token ``ids`` in a (ceil(V/32),) int32 token mask."""
    for token in ids:
        word = (int(bits[token >> 5]) & 0xFFFFFFFF) | (1 << (token & 31))
        bits[token >> 5] = word - (1 << 32) if word >= 1 << 31 else word


class ConstraintError(GemmakitError):
    """A sampled token broke the grammar (a bug, never the model's doing: the mask allows only valid tokens)."""


@dataclass(frozen=True)
class OutputRules:
    """What one request's output must do; every sequence of the request follows them with its own state.

    Attributes:
        grammar: what the constrained part must match (None: nothing is, only the other rules apply).
        trigger: a token that starts the grammar (which then begins with it); None starts it at once.
        thought_open, thought_close: the thought channel's tokens, when the model may think before the
            constrained part (Gemma 4 with thinking on). Thinking runs free.
        reasoning_budget: most tokens inside the thought channel; then its closing token is forced.
        banned: tokens never allowed (e.g. the thought channel with thinking off).
        repeat_trigger: with a trigger, whether the grammar may start again after it is done (several tool
            calls); when not, the trigger is banned once it has run.
    """

    grammar: Grammar | None = None
    trigger: int | None = None
    thought_open: int | None = None
    thought_close: int | None = None
    reasoning_budget: int | None = None
    banned: frozenset[int] = field(default_factory=frozenset)
    repeat_trigger: bool = True

    def constraint(self, tokenizer, stop_ids: Sequence[int], vocab: int,
                   end_ids: Sequence[int] | None = None) -> "OutputConstraint":
        return OutputConstraint(self, tokenizer, stop_ids, vocab, end_ids)


class OutputConstraint:
    """One sequence's progress through its :class:`OutputRules`."""

    def __init__(self, rules: OutputRules, tokenizer, stop_ids: Sequence[int], vocab: int,
                 end_ids: Sequence[int] | None = None) -> None:
        """``stop_ids``: tokens that may end the output wherever the grammar is complete (none with ignore_eos);
        ``end_ids``: those that end it once the grammar can take nothing more (default: ``stop_ids``)."""
        self.rules, self.vocab = rules, vocab
        self.stop_ids = list(stop_ids)
        self.end_ids = list(end_ids if end_ids is not None else stop_ids)
        self.matcher = None
        self._tokenizer = tokenizer
        self.state = "free" if rules.grammar is None or rules.trigger is not None else "start"
        if self.state == "free" and rules.thought_open is not None:
            self.state = "start"
        self.thought_tokens = 0
        self.thought_done = False  # one thought channel, at the start
        self.triggered = False  # the trigger has started the grammar at least once
        if self.state == "start" and rules.grammar is not None and rules.trigger is None:
            self._start_grammar()

    def _start_grammar(self) -> None:
        import llguidance

        from .vocab import ll_tokenizer

        self.matcher = llguidance.LLMatcher(ll_tokenizer(self._tokenizer), self.rules.grammar.source)
        if self.matcher.is_error():
            raise ConstraintError(f"grammar failed to start: {self.matcher.get_error()}")

    # -- before sampling ------------------------------------------------------------------------------------

    @property
    def grammar_mask_needed(self) -> bool:
        """Whether the next token's mask comes from the grammar (computed with :class:`MaskBatch`)."""
        return self.matcher is not None and self.state in ("start", "grammar")

    def fill(self, bitmask_row: torch.Tensor) -> None:
        """The grammar's mask of the next token into ``bitmask_row`` ((ceil(V/32),) int32), without the GIL."""
        self.matcher.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)

    def allowed(self, bitmask_row: torch.Tensor | None = None) -> torch.Tensor | None:
        """The tokens allowed next as a token mask ((ceil(V/32),) int32, bit i of word i // 32 set for token i), or
        None when the rules allow every token but :meth:`banned_now`. ``bitmask_row``: the grammar's mask, when
        :attr:`grammar_mask_needed` (filled by :meth:`fill`, here if not given); it is completed in place."""
        rules = self.rules
        if self.state == "thought":
            if rules.reasoning_budget is None or self.thought_tokens < rules.reasoning_budget:
                return None
            return self._only([rules.thought_close])  # the budget is spent: the channel closes
        if not self.grammar_mask_needed:
            return None
        if bitmask_row is None:
            bitmask_row = torch.full(((self.vocab + 31) // 32,), -1, dtype=torch.int32)
            self.fill(bitmask_row)
        if self.matcher.is_stopped():  # llguidance leaves its own EOS: only the sequence's end tokens end it
            return self._only(self.end_ids)
        extra = list(self.stop_ids) if self.matcher.is_accepting() else []
        if self.state == "start" and rules.thought_open is not None and not self.thought_done:
            extra.append(rules.thought_open)
        _set_bits(bitmask_row, extra)
        return bitmask_row

    def banned_now(self) -> list[int]:
        """Tokens never allowed next, whatever :meth:`allowed` says: the rules' banned ones, and the thought
        channel's opening inside the channel. A short list: a free sequence pays for these ids alone."""
        banned = list(self.rules.banned)
        if self.state == "thought":
            banned.append(self.rules.thought_open)
        if self.triggered and not self.rules.repeat_trigger and self.state == "free":
            banned.append(self.rules.trigger)
        return banned

    def _only(self, ids: Sequence[int]) -> torch.Tensor:
        bits = torch.zeros(((self.vocab + 31) // 32,), dtype=torch.int32)
        _set_bits(bits, ids)
        return bits

    # -- after sampling -------------------------------------------------------------------------------------

    def accept(self, token: int) -> None:
        """Move on with the sampled token."""
        rules = self.rules
        if self.state == "start" and token == rules.thought_open:
            self.state, self.thought_tokens = "thought", 0
            return
        if self.state == "thought":
            self.thought_tokens += 1
            if token == rules.thought_close:
                self.state, self.thought_done = ("start" if self.matcher is not None else "free"), True
            return
        if self.state == "start" and self.matcher is None:
            self.state = "free"
        if self.state == "free":
            if token == rules.trigger and rules.grammar is not None:
                self.triggered = True
                self._start_grammar()
                self.state = "grammar"
                self._consume(token)
            return
        if token in self.end_ids and (self.matcher.is_accepting() or self.matcher.is_stopped()):
            return  # the sequence ends here
        self.state = "grammar"
        self._consume(token)
        if self.matcher.is_stopped() and rules.trigger is not None:
            self.matcher, self.state = None, "free"  # a lazy grammar is done: free text until the trigger again

    def _consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} breaks the grammar: {self.matcher.get_error()}")

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar allows as the only continuation from here (none outside the grammar)."""
        if self.state != "grammar" or self.matcher is None or self.matcher.is_stopped():
            return []
        tokens = self.matcher.compute_ff_tokens()
        # llguidance tokenizes the forced bytes with the model's tokenizer; keep the tokens the grammar takes (a
        # vocabulary whose encoding and token bytes disagree, e.g. byte-fallback spaces, stops the run early).
        return list(tokens[: self.matcher.validate_tokens(tokens)]) if tokens else []


class MaskBatch:
    """Fills the grammar masks of a step's constrained sequences on a worker thread, while the forward runs.

    llguidance computes the masks of several matchers in parallel and without the GIL; the engine thread only
    waits for them after the forward, before sampling.
    """

    def __init__(self, vocab: int) -> None:
        import llguidance

        self.vocab = vocab
        self._executor = llguidance.LLExecutor()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="gemmakit-masks")

    def start(self, constraints: Sequence[OutputConstraint]) -> tuple[Future, torch.Tensor]:
        """Begin filling one mask row per constraint (in order); returns the future and the (n, ceil(V/32))
        int32 bitmask it fills."""
        bitmask = torch.full((len(constraints), (self.vocab + 31) // 32), -1, dtype=torch.int32)
        matchers = [(c.matcher, i) for i, c in enumerate(constraints)]
        row_bytes = bitmask.shape[1] * 4
        future = self._worker.submit(self._executor.unsafe_compute_mask_ptr, matchers, bitmask.data_ptr(),
                                     row_bytes, len(constraints))
        return future, bitmask

    def close(self) -> None:
        self._worker.shutdown(wait=False)
