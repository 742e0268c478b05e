"""What a constrained output must match, as one llguidance grammar: built from a JSON schema (dict or pydantic
model), ``{"type": "json_object"}``, a regex, a list of choices or a Lark grammar, and checked against the
model's vocabulary before anything runs (:func:`checked`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import InvalidGrammarError

MAX_GRAMMAR_CHARS = 200_000  # a schema or grammar larger than this is refused (it grows with the input)
MAX_CHOICES = 1024


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar (its serialized form) and what it was built from.

    Attributes:
        source: the grammar as llguidance takes it (``LLMatcher(tokenizer, source)``).
        kind: "json_schema", "json_object", "regex", "choice", "lark" or "tool_calls".
        schema: the JSON schema the output follows, when there is one (to parse and validate the answer).
        model: a pydantic model class whose instance the answer is parsed into (``Completion.parsed``).
    """

    source: str
    kind: str
    schema: Mapping[str, Any] | None = None
    model: Any = field(default=None, compare=False)


def _pydantic_schema(model: Any) -> dict[str, Any] | None:
    """A pydantic model's JSON schema, its objects closed to undeclared keys (as OpenAI's SDK makes it for
    ``.parse``: the model would drop them anyway, and a small model fills an open object with made-up keys)."""
    schema_of = getattr(model, "model_json_schema", None)
    if isinstance(model, type) and callable(schema_of):
        return _closed_objects(schema_of())
    return None


def _closed_objects(node: Any) -> Any:
    if isinstance(node, list):
        return [_closed_objects(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed_objects(v) for k, v in node.items()}
    if out.get("type") == "object" and "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def json_schema(schema: Mapping[str, Any] | Any) -> Grammar:
    """Output that is one JSON value valid against ``schema`` (a dict, or a pydantic model class)."""
    model = None
    if not isinstance(schema, Mapping):
        model, schema = schema, _pydantic_schema(schema)
        if schema is None:
            raise InvalidGrammarError("a JSON schema must be a dict or a pydantic model class")
    if len(json.dumps(schema)) > MAX_GRAMMAR_CHARS:
        raise InvalidGrammarError(f"JSON schema longer than {MAX_GRAMMAR_CHARS} characters")
    import llguidance

    try:
        source = llguidance.LLMatcher.grammar_from_json_schema(dict(schema), defaults=_JSON_OPTIONS)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InvalidGrammarError(f"invalid JSON schema: {exc}") from None
    return Grammar(source, "json_schema", dict(schema), model)


# Compact separators and no free whitespace: a model cannot pad the answer with blank lines until its token limit.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_object() -> Grammar:
    """Any JSON object (OpenAI's ``{"type": "json_object"}``)."""
    grammar = json_schema({"type": "object"})
    return Grammar(grammar.source, "json_object", grammar.schema)


def regex(pattern: str) -> Grammar:
    """Output that matches ``pattern`` in full."""
    if not isinstance(pattern, str) or not pattern:
        raise InvalidGrammarError("regex must be a non-empty string")
    if len(pattern) > MAX_GRAMMAR_CHARS:
        raise InvalidGrammarError(f"regex longer than {MAX_GRAMMAR_CHARS} characters")
    import llguidance

    return Grammar(llguidance.LLMatcher.grammar_from_regex(pattern), "regex")


def lark_literal(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def choice(options: Sequence[str]) -> Grammar:
    """Output that is exactly one of ``options``."""
    if (isinstance(options, str) or not isinstance(options, Sequence) or not options
            or not all(isinstance(o, str) and o for o in options)):
        raise InvalidGrammarError("choice must be a non-empty list of non-empty strings")
    if len(options) > MAX_CHOICES:
        raise InvalidGrammarError(f"choice lists at most {MAX_CHOICES} options, got {len(options)}")
    return lark("start: " + " | ".join(lark_literal(o) for o in options), kind="choice")


def lark(text: str, kind: str = "lark") -> Grammar:
    """A Lark grammar (llguidance's dialect: ``start`` is the top rule)."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidGrammarError("grammar must be a non-empty Lark grammar")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidGrammarError(f"grammar longer than {MAX_GRAMMAR_CHARS} characters")
    import llguidance

    return Grammar(llguidance.LLMatcher.grammar_from_lark(text), kind)


_JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


def from_response_format(response_format: Mapping[str, Any] | Any) -> Grammar | None:
    """A grammar from OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema`` with ``schema``), a
    bare JSON schema dict, or a pydantic model class; None for plain text."""
    if not isinstance(response_format, Mapping):
        return json_schema(response_format)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise InvalidGrammarError("response_format json_schema needs a 'json_schema' object with a 'schema'")
        return json_schema(spec.get("schema") or {})
    if kind is None or isinstance(kind, list) or kind in _JSON_TYPES:
        return json_schema(response_format)  # a JSON schema given directly (its "type" is a JSON type)
    raise InvalidGrammarError(f"response_format type {kind!r} is not one of text, json_object, json_schema (or a "
                              "JSON schema's type)")


def one_of(response_format: Any = None, regex_pattern: str | None = None, choices: Sequence[str] | None = None,
           grammar: str | None = None) -> Grammar | None:
    """The grammar of whichever single constraint was given (None when none was); two at once is an error."""
    given = [name for name, value in (("response_format", response_format), ("regex", regex_pattern),
                                      ("choice", choices), ("grammar", grammar)) if value is not None]
    if len(given) > 1:
        raise InvalidGrammarError(f"give one output constraint, not {' and '.join(given)}")
    if response_format is not None:
        return from_response_format(response_format)
    if regex_pattern is not None:
        return regex(regex_pattern)
    if choices is not None:
        return choice(choices)
    if grammar is not None:
        return lark(grammar)
    return None


def checked(grammar: Grammar, tokenizer) -> Grammar:
    """``grammar`` after llguidance compiled it against the model's vocabulary; InvalidGrammarError names the
    problem (a bad regex, an unsupported schema keyword, a Lark syntax error)."""
    import llguidance

    from .vocab import ll_tokenizer

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar.source, ll_tokenizer(tokenizer))
    if is_error:
        raise InvalidGrammarError(f"invalid {grammar.kind.replace('_', ' ')}: {messages[0]}")
    return grammar
