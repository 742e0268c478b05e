"""Tool calls held to the declared tools while decoding.

Gemma 4 writes calls in its own notation, ``<|tool_call>call:NAME{key:value,...}<tool_call|>``, strings inside the
``<|"|>`` token, keys bare. :func:`gemma4_tool_grammar` turns the declared tools' JSON schemas into a Lark grammar
of that notation: the name is one of the declared ones and the arguments follow that tool's schema (objects with
their properties in sorted order, as the chat template renders them; required ones present; strings, enums,
numbers, booleans, arrays with their bounds, nested objects, ``anyOf``/``oneOf``, ``$ref``, nullable types).

Gemma 1-3 have no tool tokens; they answer a tool request with one JSON object,
``{"tool_calls": [{"name": ..., "arguments": {...}}]}`` (:func:`json_tool_schema`, explained to the model by
:func:`json_tool_instructions`), constrained with the JSON schema compiler.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from ..errors import InvalidGrammarError
from .grammars import Grammar, json_schema, lark, lark_literal

MAX_ARRAY_UNROLL = 16  # arrays with bounds up to this many items are spelled out item by item


def tool_functions(tools: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The ``function`` objects of OpenAI-style tools, checked (a name, object parameters)."""
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidGrammarError(f"tools[{i}]: needs a 'function' object with a non-empty 'name'")
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, Mapping):
            raise InvalidGrammarError(f"tools[{i}] ({fn['name']}): 'parameters' must be a JSON schema object")
        functions.append(fn)
    return functions


def chosen_functions(tools: Sequence[Mapping[str, Any]], tool_choice: Any) -> list[Mapping[str, Any]]:
    """The functions a call may name under ``tool_choice`` (all of them, or the one it names)."""
    functions = tool_functions(tools)
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice.get("function"),
                                                                              Mapping) else None
        named = [f for f in functions if f["name"] == name]
        if not named:
            raise InvalidGrammarError(f"tool_choice names function {name!r}, which is not among the tools")
        return named
    return functions


class _Gemma4Rules:
    """JSON schema -> Lark rules of Gemma 4's argument notation (one rule per schema node)."""

    def __init__(self, quote: int, root: Mapping[str, Any]) -> None:
        self.q = f"<[{quote}]>"
        self.root = root
        self.rules: dict[str, str] = {}
        self._refs: dict[str, str] = {}

    def rule(self, schema: Any, hint: str) -> str:
        """The name of a rule for values of ``schema``."""
        name = f"{hint}_{len(self.rules)}"
        self.rules[name] = ""  # reserve the name (recursive $refs find it)
        self.rules[name] = self._body(schema, name)
        return name

    def _body(self, schema: Any, name: str) -> str:
        if schema is True or schema == {} or schema is None:
            return "any_value"
        if not isinstance(schema, Mapping):
            raise InvalidGrammarError(f"tool parameter schema {schema!r} is not an object")
        if "$ref" in schema:
            return self._ref(schema["$ref"])
        if "const" in schema:
            return self._literal(schema["const"])
        if "enum" in schema:
            return " | ".join(self._literal(v) for v in schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return " | ".join(self.rule(s, name) for s in schema[key])
        kind = schema.get("type")
        if isinstance(kind, list):
            return " | ".join(self.rule({**schema, "type": k}, name) for k in kind)
        if schema.get("nullable"):
            return f'{self.rule({**schema, "nullable": False}, name)} | "null"'
        return self._typed(schema, kind, name)

    def _typed(self, schema: Mapping[str, Any], kind: Any, name: str) -> str:
        if kind == "string":
            return self._string(schema)
        if kind in ("integer", "number", "boolean", "null"):
            bounds = {k: v for k, v in schema.items() if k in ("type", "minimum", "maximum", "exclusiveMinimum",
                                                               "exclusiveMaximum", "multipleOf")}
            return "%json " + json.dumps(bounds)  # numbers and literals read the same in JSON and in Gemma 4
        if kind == "array":
            return self._array(schema, name)
        if kind == "object" or "properties" in schema:
            return self._object(schema, name)
        if kind is None:
            return "any_value"
        raise InvalidGrammarError(f"tool parameter type {kind!r} is not a JSON schema type")

    def _string(self, schema: Mapping[str, Any]) -> str:
        if "pattern" in schema:
            text = "/" + schema["pattern"].lstrip("^").rstrip("$").replace("/", "\\/") + "/"
        else:
            low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
            text = f"/(?s:.{{{low},{'' if high is None else int(high)}}})/"
        return f"{self.q} {text} {self.q}"

    def _literal(self, value: Any) -> str:
        if isinstance(value, str):
            return f"{self.q} {lark_literal(value)} {self.q}" if value else f"{self.q} {self.q}"
        return lark_literal(json.dumps(value))

    def _ref(self, ref: Any) -> str:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise InvalidGrammarError(f"$ref {ref!r}: only local references (#/$defs/...) are supported")
        if ref not in self._refs:
            target: Any = self.root
            for part in ref[2:].split("/"):
                if not isinstance(target, Mapping) or part not in target:
                    raise InvalidGrammarError(f"$ref {ref!r} points to nothing")
                target = target[part]
            self._refs[ref] = f"ref_{len(self._refs)}"
            self.rules[self._refs[ref]] = ""
            self.rules[self._refs[ref]] = self._body(target, self._refs[ref])
        return self._refs[ref]

    def _array(self, schema: Mapping[str, Any], name: str) -> str:
        item = self.rule(schema.get("items", {}), name + "_item")
        low, high = int(schema.get("minItems", 0)), schema.get("maxItems")
        if high is not None and int(high) <= MAX_ARRAY_UNROLL:
            options = [" \",\" ".join([item] * n) for n in range(low, int(high) + 1)]
            return " | ".join(f'"[" {o} "]"' if o else '"[" "]"' for o in options)
        head = " \",\" ".join([item] * max(low, 1))
        tail = f'"[" {head} ("," {item})* "]"'
        return tail if low >= 1 else f'"[" "]" | {tail}'

    def _object(self, schema: Mapping[str, Any], name: str) -> str:
        props = schema.get("properties") or {}
        if not props:
            return "any_object"
        required = set(schema.get("required") or [])
        fields = [(f'"{key}:" {self.rule(value, name + "_p")}', key in required)
                  for key, value in sorted(props.items(), key=lambda kv: kv[0].lower())]
        return '"{" ' + _ordered_fields(fields) + ' "}"'

    def grammar_rules(self) -> str:
        q = self.q
        generic = [
            f'any_value: {q} /(?s:.*)/ {q} | %json {{"type": ["number", "boolean", "null"]}} | any_object | any_array',
            'any_object: "{" "}" | "{" any_pair ("," any_pair)* "}"',
            'any_pair: /[A-Za-z_][A-Za-z0-9_]*/ ":" any_value',
            'any_array: "[" "]" | "[" any_value ("," any_value)* "]"',
        ]
        return "\n".join([f"{n}: {body}" for n, body in self.rules.items()] + generic)


def _ordered_fields(fields: list[tuple[str, bool]]) -> str:
    """Lark for properties in a fixed order, each required one present, commas between those that are."""
    if not fields:
        return ""

    def tail(i: int) -> str:  # the properties from i on, each after a comma
        if i == len(fields):
            return ""
        text, required = fields[i]
        rest = tail(i + 1)
        return f'"," {text} {rest}' if required else f'("," {text})? {rest}'

    options = []
    for first, (text, required) in enumerate(fields):
        options.append(f"{text} {tail(first + 1)}".strip())
        if required:
            break
    else:
        options.append("")  # every property optional: {} too
    return "(" + " | ".join(f"({o})" if o else '""' for o in options) + ")"


def gemma4_tool_grammar(functions: Sequence[Mapping[str, Any]], ids: Mapping[str, int], *, lazy: bool,
                        parallel: bool) -> Grammar:
    """Gemma 4 tool calls for ``functions``: one call when ``lazy`` (the trigger token ``<|tool_call>`` opens
    it, the grammar holds it to its closing token), else one or more (``parallel``) calls and nothing else."""
    call_open, call_close = f"<[{ids['<|tool_call>']}]>", f"<[{ids['<tool_call|>']}]>"
    builder = _Gemma4Rules(ids['<|"|>'], {})
    calls = []
    for fn in functions:
        builder.root = fn.get("parameters") or {"type": "object"}
        args = builder.rule(builder.root if builder.root.get("properties") else {"type": "object"}, "args")
        calls.append(f'"call:" {lark_literal(fn["name"])} {args}')
    call = f"{call_open} call_body {call_close}"
    top = call if lazy or not parallel else f"({call})+"
    text = f"start: {top}\ncall_body: " + " | ".join(f"({c})" for c in calls) + "\n" + builder.grammar_rules()
    return lark(text, kind="tool_calls")


def json_tool_schema(functions: Sequence[Mapping[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON answer of a Gemma 1-3 tool request: ``{"tool_calls": [{"name", "arguments"}, ...]}``."""
    calls = [{"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": _closed(fn)},
              "required": ["name", "arguments"], "additionalProperties": False} for fn in functions]
    items: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    array: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    return {"type": "object", "properties": {"tool_calls": array}, "required": ["tool_calls"],
            "additionalProperties": False}


def _closed(fn: Mapping[str, Any]) -> dict[str, Any]:
    """A function's parameters schema, its declared properties the only ones (unless it says otherwise)."""
    params = dict(fn.get("parameters") or {"type": "object"})
    if params.get("properties"):
        params.setdefault("additionalProperties", False)
    return params


def json_tool_grammar(functions: Sequence[Mapping[str, Any]], parallel: bool) -> Grammar:
    grammar = json_schema(json_tool_schema(functions, parallel))
    return Grammar(grammar.source, "tool_calls", grammar.schema)


def json_tool_instructions(tools: Sequence[Mapping[str, Any]]) -> str:
    """What a Gemma 1-3 prompt says about the tools (the documented convention; see the README)."""
    functions = [{"name": fn["name"], "description": fn.get("description", ""),
                  "parameters": fn.get("parameters") or {"type": "object"}} for fn in tool_functions(tools)]
    return ("You can call these tools:\n" + json.dumps(functions, ensure_ascii=False, indent=1) +
            '\n\nTo call tools, answer with only a JSON object: {"tool_calls": [{"name": "<tool name>", '
            '"arguments": {<arguments>}}]}. Otherwise answer normally.')


def parse_json_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The calls of a Gemma 1-3 answer that follows the convention, or None when it is plain text."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.strip("`").removeprefix("json").strip()
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    calls = value.get("tool_calls") if isinstance(value, Mapping) else None
    if not isinstance(calls, list) or not calls:
        return None
    out = []
    for call in calls:
        if not isinstance(call, Mapping) or not isinstance(call.get("name"), str):
            return None
        args = call.get("arguments", {})
        out.append({"name": call["name"], "arguments": args if isinstance(args, Mapping) else {}})
    return out


def coerce_arguments(arguments: Any, schema: Any) -> Any:
    """Arguments read tolerantly, brought to the types the tool's schema declares: an array or object that came
    as a JSON string is decoded, numbers and booleans written as strings are converted. Anything that does not
    convert cleanly is left as it was."""
    if not isinstance(schema, Mapping):
        return arguments
    kind = schema.get("type")
    if isinstance(arguments, str):
        arguments = _from_string(arguments, kind)
    if isinstance(arguments, Mapping) and isinstance(schema.get("properties"), Mapping):
        props = schema["properties"]
        return {k: coerce_arguments(v, props.get(k)) for k, v in arguments.items()}
    if isinstance(arguments, list) and isinstance(schema.get("items"), Mapping):
        return [coerce_arguments(v, schema["items"]) for v in arguments]
    return arguments


def _from_string(text: str, kind: Any) -> Any:
    try:
        if kind in ("array", "object"):
            value = json.loads(text)
            return value if isinstance(value, list if kind == "array" else dict) else text
        if kind == "integer":
            return int(text.strip())
        if kind == "number":
            return float(text.strip())
    except ValueError:
        return text
    if kind == "boolean" and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    return text
