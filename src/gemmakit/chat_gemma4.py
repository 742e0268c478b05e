"""Gemma 4 chat format: native system role, thinking, tool declarations, tool calls and tool results.

Rendering follows Google's reference template (../shared/data/chat-templates/gemma4.jinja; the tests compare
token for token). Input messages may be OpenAI-style: an assistant message with ``tool_calls`` followed by
``role: "tool"`` results is rendered as one model turn holding the calls and the ``<|tool_response>`` blocks,
which is how the reference template expects them (``tool_responses`` on the message).

Model output is parsed back into ``reasoning`` (the ``<|channel>thought ... <channel|>`` block), ``content`` and
OpenAI-style ``tool_calls`` (from ``<|tool_call>call:name{key:value,...}<tool_call|>``), in one go or token by
token with :class:`Gemma4OutputParser`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .chat import Control, Message, Segment
from .errors import ChatTemplateError
from .generate import partial_suffix_len

Q = Control('<|"|>')  # the string delimiter token
STANDARD_KEYS = ("description", "type", "properties", "required", "nullable")


def _sorted_items(mapping: Mapping[str, Any]) -> list[tuple[str, Any]]:
    # jinja's dictsort: case-insensitive by key
    return sorted(mapping.items(), key=lambda kv: kv[0].lower())


def format_argument(value: Any, escape_keys: bool = True) -> list[Segment]:
    """A JSON value in Gemma 4's notation: strings in <|"|> delimiters, keys bare or delimited."""
    if isinstance(value, str):
        return [Q, value, Q]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, Mapping):
        out: list[Segment] = ["{"]
        for i, (k, v) in enumerate(_sorted_items(value)):
            if i:
                out.append(",")
            out += ([Q, k, Q] if escape_keys else [k]) + [":"] + format_argument(v, escape_keys)
        return out + ["}"]
    if isinstance(value, (list, tuple)):
        out = ["["]
        for i, item in enumerate(value):
            if i:
                out.append(",")
            out += format_argument(item, escape_keys)
        return out + ["]"]
    return [str(value)]


def _quoted_list(items: Sequence[Any]) -> list[Segment]:
    out: list[Segment] = []
    for i, item in enumerate(items):
        if i:
            out.append(",")
        out += [Q, str(item), Q]
    return out


def _format_parameters(properties: Mapping[str, Any], required: Any) -> list[Segment]:
    out: list[Segment] = []
    first = True
    for key, value in _sorted_items(properties):
        if key in STANDARD_KEYS:
            continue
        if not first:
            out.append(",")
        first = False
        out.append(f"{key}:{{")
        add_comma = False
        if value.get("description"):
            out += ["description:", Q, str(value["description"]), Q]
            add_comma = True
        if value.get("nullable"):
            out.append(",nullable:true" if add_comma else "nullable:true")
            add_comma = True
        vtype = value.get("type") if isinstance(value.get("type"), str) else (value.get("type") or [""])[0]
        upper = str(vtype).upper()
        if upper == "STRING":
            if value.get("enum"):
                out += ([","] if add_comma else []) + ["enum:"] + format_argument(value["enum"])
                add_comma = True
        elif upper == "OBJECT":
            out.append(",properties:{")
            if isinstance(value.get("properties"), Mapping):
                out += _format_parameters(value["properties"], value.get("required") or [])
            elif isinstance(value, Mapping):
                out += _format_parameters(value, value.get("required") or [])
            out.append("}")
            if value.get("required"):
                out += [",required:["] + _quoted_list(value["required"]) + ["]"]
        elif upper == "ARRAY":
            items = value.get("items")
            if isinstance(items, Mapping) and items:
                out.append(",items:{")
                first_item = True
                for ikey, ivalue in _sorted_items(items):
                    if ivalue is None:
                        continue
                    if not first_item:
                        out.append(",")
                    first_item = False
                    if ikey == "properties":
                        out.append("properties:{")
                        if isinstance(ivalue, Mapping):
                            out += _format_parameters(ivalue, items.get("required") or [])
                        out.append("}")
                    elif ikey == "required":
                        out += ["required:["] + _quoted_list(ivalue) + ["]"]
                    elif ikey == "type":
                        t = ivalue.upper() if isinstance(ivalue, str) else [str(x).upper() for x in ivalue]
                        out += ["type:"] + format_argument(t)
                    else:
                        out += [f"{ikey}:"] + format_argument(ivalue)
                out.append("}")
        out += ([","] if add_comma else []) + ["type:", Q, upper, Q, "}"]
    return out


def format_declaration(tool: Mapping[str, Any]) -> list[Segment]:
    """One ``<|tool>declaration:...<tool|>`` body from an OpenAI-style tool ({"type": "function", ...})."""
    fn = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ChatTemplateError("each tool needs a 'function' object with a 'name'")
    out: list[Segment] = [f"declaration:{fn['name']}{{description:", Q, str(fn.get("description", "")), Q]
    params = fn.get("parameters")
    if params:
        out.append(",parameters:{")
        if params.get("properties"):
            out += ["properties:{"] + _format_parameters(params["properties"], params.get("required")) + ["},"]
        if params.get("required"):
            out += ["required:["] + _quoted_list(params["required"]) + ["],"]
        if params.get("type"):
            out += ["type:", Q, str(params["type"]).upper(), Q, "}"]
    if "response" in fn:
        response = fn["response"] or {}
        out.append(",response:{")
        if response.get("description"):
            out += ["description:", Q, str(response["description"]), Q, ","]
        if str(response.get("type", "")).upper() == "OBJECT":
            out += ["type:", Q, "OBJECT", Q, "}"]
    out.append("}")
    return out


def strip_thinking(text: str) -> str:
    """Drop ``<|channel>...<channel|>`` blocks from an earlier model turn (the reference's history rule)."""
    result = ""
    for part in text.split("<channel|>"):
        result += part.split("<|channel>")[0] if "<|channel>" in part else part
    return result.strip()


def _content_text(message: Message, index: int, role: str) -> str | None:
    content = message.get("content")
    if content is None:
        return None
    if isinstance(content, str):
        return strip_thinking(content) if role == "model" else content.strip()
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatTemplateError(f"message {index}: only text content parts are supported")
            texts.append(strip_thinking(part["text"]) if role == "model" else part["text"].strip())
        return "".join(texts)
    raise ChatTemplateError(f"message {index}: content must be a string or a list of text parts")


def _arguments(call: Mapping[str, Any], index: int) -> Any:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ChatTemplateError(f"message {index}: each tool call needs function.name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        # OpenAI sends arguments as a JSON string; render them as the object they encode.
        try:
            parsed = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return args
        return parsed if isinstance(parsed, Mapping) else args
    return args


def _merge_tool_results(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """OpenAI ``role: tool`` messages -> ``tool_responses`` on the assistant message that made the calls."""
    merged: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ChatTemplateError(f"message {i}: each message needs a 'role'")
        if m["role"] != "tool":
            merged.append(dict(m))
            continue
        host = merged[-1] if merged else None
        if host is None or host.get("role") not in ("assistant", "model") or not (host.get("tool_calls") or host.get("tool_responses")):
            raise ChatTemplateError(f"message {i}: a tool result must follow an assistant message with tool_calls")
        names = {c.get("id"): c.get("function", {}).get("name") for c in host.get("tool_calls") or []}
        name = m.get("name") or names.get(m.get("tool_call_id")) or "unknown"
        content = m.get("content")
        try:
            response = json.loads(content) if isinstance(content, str) else content
        except json.JSONDecodeError:
            response = content
        host.setdefault("tool_responses", []).append({"name": name, "response": response})
        # The reference leaves the model turn open after results, so the answer continues in it.
        if host.get("content") in (None, ""):
            host["content"] = None
    return merged


class Gemma4ChatFormat:
    """The Gemma 4 turn format (``<|turn>`` / ``<turn|>``) with thinking and tools."""

    # The model writes <|tool_response> after its calls, expecting the caller's results: the answer ends there.
    stop_pieces = ("<eos>", "<turn|>", "<|tool_response>")

    def prepare_messages(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        """OpenAI-style input in the reference template's shape (tool results on the calling turn)."""
        return _merge_tool_results(messages)

    def render(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enable_thinking: bool = False,
    ) -> list[Segment]:
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        msgs = _merge_tool_results(messages)
        out: list[Segment] = [Control("<bos>")]
        prev = None
        first_is_system = msgs[0]["role"] in ("system", "developer")
        if enable_thinking or tools or first_is_system:
            out += [Control("<|turn>"), "system\n"]
            if enable_thinking:
                out.append(Control("<|think|>"))
            if first_is_system:
                out.append(_content_text(msgs[0], 0, "system") or "")
                msgs = msgs[1:]
            for tool in tools or []:
                out += [Control("<|tool>")] + _trim_segments(format_declaration(tool)) + [Control("<tool|>")]
            out += [Control("<turn|>"), "\n"]
        for i, m in enumerate(msgs):
            prev = None
            role = "model" if m["role"] in ("assistant", "model") else m["role"]
            if role not in ("user", "model", "system", "developer"):
                raise ChatTemplateError(f"message {i}: unknown role {m['role']!r}")
            out += [Control("<|turn>"), role + "\n"]
            for call in m.get("tool_calls") or []:
                args = _arguments(call, i)
                out += [Control("<|tool_call>"), f"call:{call['function']['name']}{{"]
                if isinstance(args, Mapping):
                    for k, (key, value) in enumerate(_sorted_items(args)):
                        out += ([","] if k else []) + [f"{key}:"] + format_argument(value, escape_keys=False)
                elif isinstance(args, str):
                    out.append(args)
                out += ["}", Control("<tool_call|>")]
            for result in m.get("tool_responses") or []:
                name = result.get("name") or "unknown"
                response = result.get("response")
                out += [Control("<|tool_response>"), f"response:{name}{{"]
                if isinstance(response, Mapping):
                    for k, (key, value) in enumerate(_sorted_items(response)):
                        out += ([","] if k else []) + [f"{key}:"] + format_argument(value, escape_keys=False)
                else:
                    out += ["value:"] + format_argument(response, escape_keys=False)
                out += ["}", Control("<tool_response|>")]
                prev = "tool_response"
            text = _content_text(m, i, role)
            if text:
                out.append(text)
            if not (m.get("tool_responses") and not m.get("content")):
                out += [Control("<turn|>"), "\n"]
        if add_generation_prompt:
            if prev != "tool_response":
                out += [Control("<|turn>"), "model\n"]
            if not enable_thinking:
                out += [Control("<|channel>"), "thought\n", Control("<channel|>")]
        return out


def _trim_segments(segments: list[Segment]) -> list[Segment]:
    """jinja's ``| trim`` on a rendered run: strip whitespace at both ends of the text."""
    if segments and isinstance(segments[0], str):
        segments[0] = segments[0].lstrip()
    if segments and isinstance(segments[-1], str):
        segments[-1] = segments[-1].rstrip()
    return segments


# ------------------------------------------------------------------------------------------------------
# Parsing model output
# ------------------------------------------------------------------------------------------------------


class ToolCallSyntaxError(ValueError):
    pass


class _ArgParser:
    """Gemma 4 argument notation -> JSON values: {key:value,...}, [..], <|"|>strings<|"|>, numbers, booleans."""

    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0

    def peek(self, token: str) -> bool:
        return self.s.startswith(token, self.i)

    def expect(self, token: str) -> None:
        if not self.peek(token):
            raise ToolCallSyntaxError(f"expected {token!r} at {self.i} in {self.s!r}")
        self.i += len(token)

    def _check_not_at_end(self) -> None:
        if self.i >= len(self.s):
            raise ToolCallSyntaxError(f"unexpected end of {self.s!r}")

    def value(self) -> Any:
        if self.peek('<|"|>'):
            self.i += 5
            end = self.s.find('<|"|>', self.i)
            if end < 0:
                raise ToolCallSyntaxError("unterminated string")
            out, self.i = self.s[self.i : end], end + 5
            return out
        if self.peek("'") or self.peek('"'):  # a model that quotes like JSON or Python: read it as a string
            quote = self.s[self.i]
            end = self.s.find(quote, self.i + 1)
            if end < 0:
                raise ToolCallSyntaxError("unterminated string")
            out, self.i = self.s[self.i + 1 : end], end + 1
            return out
        if self.peek("{"):
            return self.obj()
        if self.peek("["):
            self.i += 1
            items = []
            while not self.peek("]"):
                self._check_not_at_end()
                items.append(self.value())
                if self.peek(","):
                    self.i += 1
            self.i += 1
            return items
        j = self.i
        while j < len(self.s) and self.s[j] not in ",}]":
            j += 1
        raw, self.i = self.s[self.i : j].strip(), j
        if raw in ("true", "false"):
            return raw == "true"
        if raw in ("null", "None"):
            return None
        try:
            return int(raw)
        except ValueError:
            try:
                return float(raw)
            except ValueError:
                return raw

    def obj(self) -> dict[str, Any]:
        self.expect("{")
        out: dict[str, Any] = {}
        while not self.peek("}"):
            self._check_not_at_end()
            if self.peek('<|"|>'):
                key = self.value()
            else:
                j = self.s.find(":", self.i)
                if j < 0:
                    raise ToolCallSyntaxError(f"missing ':' in {self.s!r}")
                key, self.i = self.s[self.i : j].strip().strip("'\""), j
            self.expect(":")
            out[key] = self.value()
            if self.peek(","):
                self.i += 1
            elif not self.peek("}"):
                raise ToolCallSyntaxError(f"expected ',' or '}}' at {self.i} in {self.s!r}")
        self.i += 1
        return out


def parse_tool_call(body: str) -> dict[str, Any]:
    """``call:name{...}`` -> {"name": ..., "arguments": {...}}."""
    body = body.strip()
    if not body.startswith("call:") or "{" not in body:
        raise ToolCallSyntaxError(f"not a tool call: {body!r}")
    brace = body.index("{")
    parser = _ArgParser(body[brace:])
    args = parser.obj()
    return {"name": body[5:brace].strip(), "arguments": args}


@dataclass
class ParsedOutput:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class Gemma4OutputParser:
    """Splits model output text, fed in any pieces (one token at a time when streaming), into reasoning,
    content and tool calls. :meth:`feed` returns the (content, reasoning) text that became final."""

    MARKERS = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<turn|>", "<|tool_response>")

    def __init__(self) -> None:
        self.result = ParsedOutput()
        self._buf = ""
        self._mode = "content"  # content | channel_header | thought | tool_call
        self._header = ""  # the channel's name, as it arrives
        self._call = ""
        self._late_content = ""  # a tool call that could not be parsed, released as content

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        content, reasoning = "", ""
        while self._buf:
            marker_at = [(self._buf.find(m), m) for m in self.MARKERS]
            hits = [(i, m) for i, m in marker_at if i >= 0]
            if not hits:
                keep = partial_suffix_len(self._buf, self.MARKERS)
                ready, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
                c, r = self._emit(ready)
                content, reasoning = content + c, reasoning + r
                break
            at, marker = min(hits)
            c, r = self._emit(self._buf[:at])
            content, reasoning = content + c, reasoning + r
            self._buf = self._buf[at + len(marker) :]
            self._on_marker(marker)
            if self._late_content:
                content += self._emit_late()
        return content, reasoning

    def _emit_late(self) -> str:
        late, self._late_content = self._late_content, ""
        self.result.content += late
        return late

    def finish_stream(self) -> tuple[str, str]:
        """At the end of the output: the (content, reasoning) still held back (a partial marker, an unclosed
        tool call, which is kept as text)."""
        content, reasoning = "", ""
        if self._mode == "tool_call":  # a call cut off by the token limit: its text, not its markup
            self._late_content += (self._call + self._buf).replace('<|"|>', '"')
            self._buf, self._mode = "", "content"
        if self._buf and self._mode in ("content", "thought"):
            content, reasoning = self._emit(self._buf)
        self._buf = ""
        return content + self._emit_late(), reasoning

    def _emit(self, text: str) -> tuple[str, str]:
        if not text or self._mode == "done":
            return "", ""
        if self._mode == "channel_header":
            # "<|channel>thought\n" names the channel; what follows is the thought. Text that is not that name
            # (a model that skips it) is thought already.
            self._header += text
            if len(self._header) < len("thought\n") and "thought\n".startswith(self._header):
                return "", ""  # still inside the channel name
            text = self._header.removeprefix("thought\n")
            self._mode = "thought"
        if self._mode == "thought":
            self.result.reasoning += text
            return "", text
        if self._mode == "tool_call":
            self._call += text
            return "", ""
        self.result.content += text
        return text, ""

    def _on_marker(self, marker: str) -> None:
        if marker == "<|channel>":
            self._mode, self._header = "channel_header", ""
        elif marker == "<channel|>":
            self._mode = "content"
        elif marker == "<|tool_call>":
            self._mode, self._call = "tool_call", ""
        elif marker == "<tool_call|>":
            self._mode = "content"
            try:
                self.result.tool_calls.append(parse_tool_call(self._call))
            except ToolCallSyntaxError:  # unreadable even tolerantly: its text kept (not its markup), not dropped
                self._late_content += self._call.replace('<|"|>', '"')
        else:  # end of turn, or the model writing a tool response itself: stop taking content
            self._mode = "done"

    def finish(self) -> ParsedOutput:
        self.finish_stream()
        return self.result


def parse_output(text: str) -> ParsedOutput:
    """Parse a whole model output at once (same result as feeding it token by token)."""
    parser = Gemma4OutputParser()
    parser.feed(text)
    return parser.finish()
