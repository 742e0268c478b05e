"""The safety policy around the Python API's calls (``LLM.generate``, ``stream``, ``chat``, ``chat_stream``): input
screening, the whole answer's check, and streamed events held back a window at a time. The server does the same
steps off its event loop (``gemmakit.server.safety``) and shares the message helpers here.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Iterator, Mapping, Sequence

from ..generate import Completion, StreamEvent
from .pii import Redactor
from .service import ContentPolicyError, Decision, Safety
from .stream import DEFAULT_WINDOW, OutputGate

Slot = tuple[int, int | None]  # (message index, text part index or None for a string content)


def text_slots(messages: Sequence[Mapping[str, Any]]) -> list[Slot]:
    """Where chat messages hold text: (message, None) for a string content, (message, part) for a text part."""
    slots: list[Slot] = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, str):
            slots.append((i, None))
        elif isinstance(content, list):
            slots += [(i, k) for k, part in enumerate(content) if isinstance(part, dict)
                      and part.get("type") == "text" and isinstance(part.get("text"), str)]
    return slots


def slot_texts(messages: Sequence[Mapping[str, Any]], slots: list[Slot]) -> list[str]:
    return [messages[i]["content"] if k is None else messages[i]["content"][k]["text"] for i, k in slots]


def with_texts(messages: Sequence[Mapping[str, Any]], slots: list[Slot], texts: list[str]) -> list[dict[str, Any]]:
    """A copy of ``messages`` with the texts at ``slots`` replaced."""
    out = copy.deepcopy(list(messages))
    for (i, k), text in zip(slots, texts):
        if k is None:
            out[i]["content"] = text
        else:
            out[i]["content"][k]["text"] = text
    return out


def screened(decision: Decision) -> Decision:
    """``decision``, or ContentPolicyError when it blocks."""
    if decision.blocked:
        raise ContentPolicyError(decision.blocked, "input")
    return decision


def screen_prompt(safety: Safety, prompt: str) -> tuple[str, Redactor]:
    """The prompt to run (redacted where the policy says so) and the redactor that restores the answer."""
    if not safety.screens_input:
        return prompt, Redactor()
    decision = screened(safety.decide([prompt], "input"))
    return decision.texts[0], decision.redactor


def screen_messages(safety: Safety, messages: Sequence[Mapping[str, Any]]) -> tuple[Sequence[Mapping[str, Any]],
                                                                                    Redactor]:
    """The chat messages to run (redacted copies where the policy says so) and the redactor."""
    if not safety.screens_input:
        return messages, Redactor()
    slots = text_slots(messages)
    decision = screened(safety.decide(slot_texts(messages, slots), "input"))
    return (with_texts(messages, slots, decision.texts) if decision.redacted else messages), decision.redactor


def guard_completion(safety: Safety, completion: Completion, redactor: Redactor) -> Completion:
    """The answer after the output policy: emptied with ``finish_reason="content_filter"`` when it blocks,
    otherwise with redacted personal data put back."""
    answer = "\n".join(filter(None, [completion.reasoning, completion.text]))
    if safety.checks_output and answer and safety.decide([answer], "output").blocked:
        return replace(completion, text="", reasoning=None, tool_calls=None, parsed=None,
                       finish_reason="content_filter")
    reasoning = redactor.restore(completion.reasoning) if completion.reasoning else completion.reasoning
    return replace(completion, text=redactor.restore(completion.text), reasoning=reasoning)


class _Held:
    """One text field of a stream (``text``, ``content`` or ``reasoning``): its output gate and its restorer."""

    def __init__(self, safety: Safety, redactor: Redactor, window: int) -> None:
        self.gate = OutputGate(lambda texts: safety.decide(texts, "output"), window) if safety.checks_output \
            else None
        self.restorer = redactor.streaming()

    def release(self, piece: str, last: bool) -> str:
        if self.gate is not None:
            out = self.gate.check() if self.gate.push(piece) else ""
            piece = out + (self.gate.finish() if last else "")
        return self.restorer.feed(piece) + (self.restorer.finish() if last else "")

    @property
    def blocked(self) -> bool:
        return self.gate is not None and bool(self.gate.blocked)


def guard_events(events: Iterator[StreamEvent], safety: Safety, redactor: Redactor, chat: bool,
                 window: int = DEFAULT_WINDOW) -> Iterator[StreamEvent]:
    """Stream events whose text has passed the output policy: held back and released a checked window at a time
    (``text``; for chat answers ``content`` and ``reasoning``, with ``text`` their released sum). A violation ends
    the stream with one event of ``finish_reason="content_filter"`` and stops the generation."""
    fields = ("content", "reasoning") if chat else ("text",)
    held = {f: _Held(safety, redactor, window) for f in fields}
    try:
        for ev in events:
            last = ev.finish_reason is not None
            out = {f: held[f].release(getattr(ev, f) or "", last) for f in fields}
            if any(h.blocked for h in held.values()):
                yield replace(ev, text="", content=None, reasoning=None, tool_calls=None,
                              finish_reason="content_filter")
                return
            if chat:
                out["text"] = out["content"] + out["reasoning"]
                out = {k: (v or None) if k != "text" else v for k, v in out.items()}
            yield replace(ev, **out)
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # a blocked answer stops its generation
