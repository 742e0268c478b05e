"""One path for chat answers: the generation's events split, as they arrive, into answer text, thought text and
tool calls. Streamed and non-streamed answers, the server and the Python API all read the same split events
(:func:`split_chat_events`), so no channel or tool-call markup reaches ``content`` on any of them."""

from __future__ import annotations

import json
import uuid
from typing import Any, Iterator, Mapping, Sequence

from ..generate import StreamEvent
from .tools import coerce_arguments, parse_json_tool_calls


def openai_tool_call(name: str, arguments: Any) -> dict[str, Any]:
    """A tool call in OpenAI's shape (JSON-encoded arguments, a fresh id)."""
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


class ChatOutputSplitter:
    """Splits one sequence's output text, fed event by event, into content, reasoning and tool calls.

    Gemma 4: its thought channel and ``<|tool_call>`` blocks, by :class:`~gemmakit.chat_gemma4.Gemma4OutputParser`.
    Gemma 1-3 with tools: the answer is held until it ends, then read as the JSON tool-call convention (or
    released as text when it is not one).
    """

    def __init__(self, architecture: str, tools: Sequence[Mapping[str, Any]] | None = None,
                 hold_for_tools: bool = False) -> None:
        self.gemma4 = architecture == "gemma4"
        self.schemas = {(t.get("function") or {}).get("name"): (t.get("function") or {}).get("parameters")
                        for t in tools or [] if isinstance(t, Mapping)}
        self.hold = hold_for_tools and not self.gemma4
        self.held = ""
        self.parser = None
        if self.gemma4:
            from ..chat_gemma4 import Gemma4OutputParser

            self.parser = Gemma4OutputParser()
        self._calls_seen = 0

    def split(self, event: StreamEvent) -> StreamEvent:
        """Set the event's ``content``, ``reasoning`` and ``tool_calls`` from its text (and, on the last event,
        from whatever was still held)."""
        if self.parser is not None:
            content, reasoning = self.parser.feed(event.text)
            if event.finish_reason:
                tail = self.parser.finish_stream()
                content, reasoning = content + tail[0], reasoning + tail[1]
            calls = self.parser.result.tool_calls[self._calls_seen :]
            self._calls_seen += len(calls)
            event.content, event.reasoning = content, reasoning
            event.tool_calls = [self._call(c["name"], c["arguments"]) for c in calls] or None
        elif self.hold:
            self.held += event.text
            event.content = ""
            if event.finish_reason:
                calls = parse_json_tool_calls(self.held)
                if calls is None:
                    event.content = self.held
                else:
                    event.tool_calls = [self._call(c["name"], c["arguments"]) for c in calls]
        else:
            event.content = event.text
        return event

    def _call(self, name: str, arguments: Any) -> dict[str, Any]:
        return openai_tool_call(name, coerce_arguments(arguments, self.schemas.get(name)))


def split_chat_events(events: Iterator[StreamEvent], splitter: ChatOutputSplitter) -> Iterator[StreamEvent]:
    """The events of a chat answer with their content, reasoning and tool calls split out."""
    for event in events:
        yield splitter.split(event)
