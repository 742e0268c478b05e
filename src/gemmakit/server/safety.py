"""The safety policy in the request path: input screening before a prompt is built, the answer's check (whole, or
window by window when streamed), putting redacted personal data back into the answer, and the counters.

The guards run in worker threads (a check costs milliseconds): the event loop keeps serving other streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from ..safety import ContentPolicyError, Decision, Redactor, Role, Safety
from ..safety.apply import slot_texts, text_slots, with_texts
from ..safety.pii import StreamRestorer
from ..safety.stream import OutputGate
from .audit import audit_answer, audit_decision
from .errors import APIError
from .state import ServerState


@dataclass
class Screened:
    """What input screening left for the rest of the request: the redactor (to restore the answer) and whether
    the answer must pass the output guards."""

    redactor: Redactor
    check_output: bool

    def restorer(self) -> StreamRestorer:
        return self.redactor.streaming()


def _record(state: ServerState, request: Request, role: str, scores: dict[str, float], actions: dict[str, str],
            by_guard: dict[str, dict[str, float]]) -> None:
    """Count a decision (metrics) and put it in the request's audit row."""
    state.metrics.safety(role, actions)
    audit_decision(request, role, scores, actions, by_guard)


def _record_decision(state: ServerState, request: Request, decision: Decision, role: Role) -> None:
    _record(state, request, role, decision.scores(), decision.actions, decision.by_guard)


async def screen(state: ServerState, request: Request, texts: list[str], role: Role = "input") -> Decision:
    """Apply the policy to ``texts`` off the loop, count it, and raise ContentPolicyError when it blocks."""
    decision = await run_in_threadpool(state.safety.decide, texts, role)
    _record_decision(state, request, decision, role)
    if decision.blocked:
        raise ContentPolicyError(decision.blocked, role)
    return decision


async def screen_messages(state: ServerState, request: Request,
                          messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Screened]:
    """The chat messages to use (redacted copies where the policy says so) and what the answer needs."""
    safety: Safety = state.safety
    if not safety.screens_input:
        return messages, Screened(Redactor(), safety.checks_output)
    slots = text_slots(messages)
    decision = await screen(state, request, slot_texts(messages, slots))
    if decision.redacted:
        messages = with_texts(messages, slots, decision.texts)
    return messages, Screened(decision.redactor, safety.checks_output)


async def screen_prompts(state: ServerState, request: Request,
                         prompts: list[str | list[int]]) -> tuple[list[str | list[int]], Screened]:
    """The completion prompts to use and what the answers need. Prompts given as token ids are screened as the
    text they decode to; a redacted one is then sent as its redacted text."""
    safety: Safety = state.safety
    if not safety.screens_input:
        return prompts, Screened(Redactor(), safety.checks_output)
    texts = [p if isinstance(p, str) else await run_in_threadpool(state.llm.tokenizer.decode, p) for p in prompts]
    decision = await screen(state, request, texts)
    return (decision.texts if decision.redacted else prompts), Screened(decision.redactor, safety.checks_output)


def refuse_streamed_logprobs(state: ServerState, body) -> None:
    """Streamed logprobs carry each token's text as it is made: with output guards on, that would pass text before
    its check."""
    if state.safety.checks_output and body.stream and body.logprobs:
        raise APIError(400, "logprobs cannot be streamed while the server's output guards are on: token texts would "
                       "reach the client before their check; ask without stream", param="logprobs")


async def answer_blocked(state: ServerState, request: Request, text: str, screened: Screened) -> bool:
    """Whether a whole (non-streamed) answer fails the output policy (counted either way); a passed answer goes
    into the audit row."""
    blocked = False
    if screened.check_output and text:
        decision = await run_in_threadpool(state.safety.decide, [text], "output")
        _record_decision(state, request, decision, "output")
        blocked = bool(decision.blocked)
    if not blocked and keeps_text(state):
        audit_answer(request, text)
    return blocked


def keeps_text(state: ServerState) -> bool:
    """Whether the audit log keeps prompt and answer text."""
    return state.audit is not None and state.audit.store_text


class StreamedAnswer:
    """One streamed choice's text on its way out: held by the output gate (when the policy checks output), then
    with redacted personal data put back. ``blocked`` turns True when the gate stops the answer."""

    def __init__(self, state: ServerState, request: Request, screened: Screened) -> None:
        self.state, self.request = state, request
        self.gate = OutputGate(lambda texts: state.safety.decide(texts, "output"), state.safety_window) \
            if screened.check_output else None
        self.restorer = screened.restorer()
        self.keep_text = keeps_text(state)
        # Without output guards, redaction or audited text (the default), each token's text goes out as it is.
        self.passthrough = self.gate is None and not screened.redactor.originals and not self.keep_text
        self._counted = False

    @property
    def blocked(self) -> bool:
        return self.gate is not None and bool(self.gate.blocked)

    async def feed(self, text: str) -> str:
        """The text that may go out now."""
        if self.gate is not None:
            if not self.gate.push(text):
                return ""
            text = await run_in_threadpool(self.gate.check)
            self._count_if_blocked()
        text = self.restorer.feed(text)
        if self.keep_text:
            audit_answer(self.request, text)
        return text

    async def finish(self) -> str:
        """The rest, at the end of the answer ("" when blocked)."""
        text = ""
        if self.gate is not None:
            text = await run_in_threadpool(self.gate.finish)
            self._count_if_blocked()
            if not self.gate.blocked:
                self._count()
        text = self.restorer.feed(text)
        if self.keep_text:
            audit_answer(self.request, text)
        return text + self.restorer.finish() if not self.blocked else ""

    async def release(self, text: str, last: bool) -> str:
        """:meth:`feed`, then :meth:`finish` when this is the answer's last piece."""
        if self.passthrough:
            return text
        out = await self.feed(text)
        return out + await self.finish() if last else out

    def _count_if_blocked(self) -> None:
        if self.gate.blocked and not self._counted:
            self._counted = True
            self._count()

    def _count(self) -> None:
        _record(self.state, self.request, "output", self.gate.scores, self.gate.actions, self.gate.by_guard)
