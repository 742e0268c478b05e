"""Chat formats: messages -> prompt segments (control-token ids and plain text).

Only the template emits control tokens; message text is always encoded as text, so a user who types
``<end_of_turn>`` or ``<start_of_turn>model`` gets those characters, not a forged turn.

Gemma 3 (and 1/2) format, as the reference HF template renders it::

    <bos><start_of_turn>user\\n{system}\\n\\n{first user text}<end_of_turn>\\n<start_of_turn>model\\n...

No native system role: a leading system message is folded into the first user turn. Roles must alternate
user / assistant starting with user. Text is trimmed of surrounding whitespace (the system text is not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import ChatTemplateError
from .tokenizer import Tokenizer

Message = Mapping[str, Any]


@dataclass(frozen=True)
class Control:
    """A control token in a rendered prompt, by its piece text (e.g. ``<start_of_turn>``)."""

    piece: str


Segment = str | Control


def _message_text(message: Message, index: int, trim: bool) -> str:
    """A message's text; with ``trim``, each text part is stripped (as the reference template does)."""
    content = message.get("content")
    if isinstance(content, str):
        return content.strip() if trim else content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or "type" not in part:
                raise ChatTemplateError(f"message {index}: content parts must be objects with a 'type'")
            if part["type"] != "text":
                raise ChatTemplateError(
                    f"message {index}: content part type {part['type']!r} is not supported (text only)"
                )
            if not isinstance(part.get("text"), str):
                raise ChatTemplateError(f"message {index}: a text part needs a string 'text'")
            texts.append(part["text"].strip() if trim else part["text"])
        return "".join(texts)
    raise ChatTemplateError(f"message {index}: content must be a string or a list of text parts")


class Gemma3ChatFormat:
    """The Gemma 1/2/3 turn format (``<start_of_turn>`` / ``<end_of_turn>``)."""

    start_turn = "<start_of_turn>"
    end_turn = "<end_of_turn>"
    stop_pieces = ("<eos>", "<end_of_turn>")

    def render(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool = False,
    ) -> list[Segment]:
        """Segments of the prompt for ``messages``. Gemma 1-3 have no tool or thinking tokens.

        Raises:
            ChatTemplateError: empty conversation, unknown role, roles out of order, bad content.
        """
        if tools:
            raise ChatTemplateError("this model's chat format (Gemma 1-3) has no tool-calling tokens")
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m:
                raise ChatTemplateError(f"message {i}: each message needs a 'role'")
        prefix = ""
        turns = list(messages)
        # OpenAI's newer clients send the system prompt as role "developer".
        if turns[0]["role"] in ("system", "developer"):
            prefix = _message_text(turns[0], 0, trim=False) + "\n\n"
            turns = turns[1:]
        segments: list[Segment] = [Control("<bos>")]
        offset = len(messages) - len(turns)
        for k, message in enumerate(turns):
            index = k + offset
            role = message["role"]
            expected = "user" if k % 2 == 0 else "assistant"
            role = {"model": "assistant", "developer": "system"}.get(role, role)
            if role not in ("user", "assistant", "system"):
                raise ChatTemplateError(f"message {index}: unknown role {role!r} (use system, user or assistant)")
            if role != expected:
                where = "only as the first message" if role == "system" else f"expected {expected!r}"
                raise ChatTemplateError(
                    f"message {index}: role {message['role']!r} is out of order ({where}); after an optional system "
                    "message, roles must alternate user/assistant starting with user"
                )
            text = _message_text(message, index, trim=True)
            if k == 0:
                text = prefix + text
            speaker = "model" if role == "assistant" else "user"
            segments += [Control(self.start_turn), f"{speaker}\n{text}", Control(self.end_turn), "\n"]
        if add_generation_prompt:
            segments += [Control(self.start_turn), "model\n"]
        return segments


def segments_to_text(segments: Sequence[Segment]) -> str:
    return "".join(s.piece if isinstance(s, Control) else s for s in segments)


def segments_to_ids(segments: Sequence[Segment], tokenizer: Tokenizer) -> list[int]:
    """Token ids: control segments by id, text segments encoded as text (never parsed for control tokens)."""
    ids: list[int] = []
    text = ""  # adjacent text segments are one run of text between control tokens: encode them together
    for s in list(segments) + [None]:
        if isinstance(s, str):
            text += s
            continue
        if text:
            ids.extend(tokenizer.encode(text))
            text = ""
        if isinstance(s, Control):
            ids.append(tokenizer.token_id(s.piece))
    return ids


def chat_format_for(architecture: str):
    """The chat format of a model family, chosen from the model, never from a user's guess."""
    if architecture in ("gemma", "gemma2", "gemma3"):
        return Gemma3ChatFormat()
    if architecture == "gemma4":
        from .chat_gemma4 import Gemma4ChatFormat

        return Gemma4ChatFormat()
    raise ChatTemplateError(f"no chat format for architecture {architecture!r}")
