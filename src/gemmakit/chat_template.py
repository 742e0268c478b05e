"""Chat templates shipped with a checkpoint (HF ``chat_template.jinja`` / ``tokenizer_config.json``, GGUF
``tokenizer.chat_template``), rendered in a jinja2 sandbox.

The rendered text is turned into segments so that only the template can emit control tokens: message text is
located in the rendering (in order) and kept as plain text, while the template's own text is split at control-
token strings. Adjacent text is then encoded together, which gives the same ids as tokenizing the whole
rendering with special-token parsing, except that a user who types ``<end_of_turn>`` gets those characters.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .chat import Control, Message, Segment
from .errors import ChatTemplateError


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _message_texts(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    texts: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, Sequence):
            texts += [p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
    return texts


class CheckpointChatFormat:
    """Renders with a checkpoint's own jinja template; stop pieces and output parsing stay the family's."""

    def __init__(self, template: str, family_format: Any, control_pieces: Sequence[str], bos: str, eos: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(template)
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template does not parse: {exc}") from None
        self.family = family_format
        self.stop_pieces = family_format.stop_pieces
        # Only control strings written in the template (or passed in as bos/eos) can come out of it.
        used = [p for p in control_pieces if p and (p in template or p in (bos, eos))]
        ordered = sorted(used, key=len, reverse=True)  # longest first: alternation picks the longest match
        self._control_re = re.compile("|".join(re.escape(p) for p in ordered)) if ordered else None
        self._bos, self._eos = bos, eos

    def render(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool = False,
    ) -> list[Segment]:
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        prepared = getattr(self.family, "prepare_messages", lambda m: [dict(x) for x in m])(messages)
        try:
            text = self._template.render(
                messages=prepared, tools=tools or None, add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking, bos_token=self._bos, eos_token=self._eos,
            )
        except ChatTemplateError:
            raise
        except Exception as exc:  # sandbox violations, undefined names, type errors inside the template
            raise ChatTemplateError(f"the model's chat template failed: {exc}") from None
        return self._segments(text, _message_texts(prepared))

    def _segments(self, text: str, user_texts: list[str]) -> list[Segment]:
        out: list[Segment] = []
        pos = 0
        for user in user_texts:
            needle = user.strip()
            at = text.find(needle, pos) if needle else -1
            if at < 0:
                continue  # the template rewrote this text; its rendering is treated as template text
            out += self._split_controls(text[pos:at])
            out.append(needle)
            pos = at + len(needle)
        return out + self._split_controls(text[pos:])

    def _split_controls(self, text: str) -> list[Segment]:
        if self._control_re is None:
            return [text] if text else []
        out: list[Segment] = []
        start = 0
        for m in self._control_re.finditer(text):
            if m.start() > start:
                out.append(text[start : m.start()])
            out.append(Control(m.group(0)))
            start = m.end()
        if start < len(text):
            out.append(text[start:])
        return out


def find_checkpoint_template(folder: Path | None = None, gguf_metadata: Mapping[str, Any] | None = None) -> str | None:
    """The chat template a checkpoint ships, if any."""
    if gguf_metadata is not None:
        value = gguf_metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value.strip() else None
    if folder is None:
        return None
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None
        if isinstance(template, list):  # named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) and template.strip() else None
    return None
