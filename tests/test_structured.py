"""Constrained decoding on the default model (Gemma 3 270M): JSON schemas, regex, choice and Lark grammars through
the Python API and the engine; every answer that finishes parses and validates (jsonschema, the reference
validator); constrained and free rows batched together give the same tokens as alone."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from gemmakit import SamplingParams
from gemmakit.engine import Engine
from gemmakit.errors import InvalidGrammarError
from gemmakit.quant.linear import set_decode_x_bits

OBJ = {"type": "object", "additionalProperties": False}


def obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    return {**OBJ, "properties": properties, "required": list(properties) if required is None else required, **extra}


SCHEMAS = {
    "nested_object": obj({"person": obj({"name": {"type": "string", "maxLength": 16},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 120}})}),
    "array_bounds": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2,
                     "maxItems": 4},
    "enum": obj({"color": {"enum": ["red", "green", "blue"]}}),
    "pattern": obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    "any_of": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 8}]},
    "one_of": obj({"pet": {"oneOf": [obj({"kind": {"const": "cat"}, "lives": {"type": "integer", "minimum": 1,
                                                                                "maximum": 9}}),
                                     obj({"kind": {"const": "dog"}, "good": {"type": "boolean"}})]}}),
    "refs": {"$defs": {"point": obj({"x": {"type": "number", "minimum": -10, "maximum": 10},
                                     "y": {"type": "number", "minimum": -10, "maximum": 10}})},
             **obj({"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}})},
    "nullable": obj({"middle_name": {"type": ["string", "null"], "maxLength": 10}}),
    "number_bounds": obj({"temp": {"type": "number", "minimum": -50, "maximum": 50},
                          "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 1000}}),
    "optional_closed": obj({"a": {"type": "boolean"}, "b": {"type": "integer", "minimum": 0, "maximum": 5}}, ["a"]),
    "boolean": {"type": "boolean"},
    "top_enum": {"enum": ["yes", "no"]},
    "array_of_objects": {"type": "array", "items": obj({"id": {"type": "integer", "minimum": 1, "maximum": 100},
                                                        "tag": {"type": "string", "maxLength": 6}}),
                         "minItems": 1, "maxItems": 3},
    "const": obj({"version": {"const": 2}, "ok": {"type": "boolean"}}),
    "date_pattern": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
    "nested_arrays": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                           "maximum": 9}, "maxItems": 3},
                      "maxItems": 3},
    "null": obj({"n": {"type": "null"}}),
    "recursive_ref": {"$defs": {"node": obj({"v": {"type": "integer", "minimum": 0, "maximum": 9},
                                             "kids": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                                      "maxItems": 2}}, ["v"])},
                      "$ref": "#/$defs/node"},
    "string_length": obj({"code": {"type": "string", "minLength": 3, "maxLength": 3}}),
    "multiple_of": {"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 5},
    "nullable_object": {"anyOf": [{"type": "null"}, obj({"q": {"type": "string", "maxLength": 5}})]},
    "mixed_record": obj({"title": {"type": "string", "maxLength": 24}, "year": {"type": "integer", "minimum": 1900,
                                                                                "maximum": 2100},
                         "rating": {"type": "number", "minimum": 0, "maximum": 5},
                         "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "action"]},
                                    "maxItems": 2}}),
}
MESSAGES = [{"role": "user", "content": "Describe a film as JSON."}]


@pytest.fixture(scope="module")
def engine(llm):
    engine = Engine(llm.model, llm.tokenizer, llm.stop_token_ids, 512, max_batch=16)
    yield engine
    engine.shutdown()


def run_all(engine, jobs):
    """(ids, params, rules) per job through one engine, all at once; their finished completions."""
    from gemmakit.generate import collect

    streams = [engine.submit(ids, params, rules=rules) for ids, params, rules in jobs]
    return [collect(iter(s), len(ids), False) for s, (ids, _, _) in zip(streams, jobs)]


def test_every_schema_answer_that_stops_validates(llm, engine) -> None:
    jobs, names = [], []
    for name, schema in SCHEMAS.items():
        ids, plan = llm.plan_chat(MESSAGES, response_format=schema)
        for params in (SamplingParams(temperature=0, max_tokens=96),
                       SamplingParams(temperature=0.8, seed=7, max_tokens=96)):
            jobs.append((ids, params, plan.rules))
            names.append(name)
    results = run_all(engine, jobs)
    stopped = 0
    for name, c in zip(names, results):
        if c.finish_reason != "stop":
            continue
        stopped += 1
        value = json.loads(c.text)
        jsonschema.validate(value, SCHEMAS[name])  # raises on an invalid answer
    print(f"{stopped} of {len(results)} answers stopped; all of them validate")
    assert stopped >= len(results) * 3 // 4  # most finish within 96 tokens: the check above is not vacuous


def test_json_object_regex_choice_and_lark(llm) -> None:
    c = llm.chat([{"role": "user", "content": 'Reply with a JSON object with the key "ok".'}],
                 response_format={"type": "json_object"}, temperature=0, max_tokens=64)
    assert c.finish_reason == "stop" and isinstance(json.loads(c.text), dict) and c.parsed == json.loads(c.text)
    c = llm.generate("My phone number is", regex=r"\(\d{3}\) \d{3}-\d{4}", temperature=0.9, seed=3)
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", c.text) and c.finish_reason == "stop"
    options = ["positive", "negative", "neutral"]
    for seed in range(3):
        c = llm.generate("Sentiment of 'I loved it':", choice=options, temperature=1.0, seed=seed)
        assert c.text in options and c.finish_reason == "stop"
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[1-9][0-9]?/'
    c = llm.generate("Q: 2+2?", grammar=grammar, temperature=0)
    assert re.fullmatch(r"The answer is [1-9][0-9]?\.", c.text)


def test_pydantic_model_comes_back_parsed(llm) -> None:
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=20)
        population: int = Field(ge=0, le=10**9)

    c = llm.chat([{"role": "user", "content": "A city as JSON."}], response_format=City, temperature=0,
                 max_tokens=64)
    assert c.finish_reason == "stop"
    assert isinstance(c.parsed, City) and c.parsed == City.model_validate_json(c.text)


@pytest.mark.parametrize("kwargs,fragment", [
    ({"response_format": {"type": "object", "properties": {"a": {"type": "bogus"}}}}, "json schema"),
    ({"response_format": {"$ref": "#/$defs/missing"}}, "missing"),
    ({"regex": "(["}, "regex"),
    ({"grammar": "start: undefined_rule"}, "undefined_rule"),
    ({"choice": []}, "choice"),
    ({"regex": "a", "choice": ["a"]}, "one output constraint"),
])
def test_bad_constraint_is_a_named_error(llm, kwargs, fragment) -> None:
    with pytest.raises(InvalidGrammarError, match=re.escape(fragment)):
        llm.generate("x", max_tokens=4, **kwargs)


@pytest.mark.parametrize("bits", [16, 8])
def test_constrained_rows_batched_match_alone(llm, bits: int) -> None:
    """Batch invariance: a constrained sequence gives the same tokens alone (the single-sequence path) as in an
    engine batch beside unconstrained and other constrained rows; so does a free one. With 8-bit decode x too,
    which turns any float difference between the two paths into other tokens (a short prompt goes through the
    engine's kernels on both)."""
    set_decode_x_bits(llm.model, bits)
    try:
        _constrained_rows_batched_match_alone(llm)
    finally:
        set_decode_x_bits(llm.model, 16)


def _constrained_rows_batched_match_alone(llm) -> None:
    schema = SCHEMAS["mixed_record"]
    greedy = SamplingParams(temperature=0, max_tokens=48)
    sampled = SamplingParams(temperature=0.9, seed=11, max_tokens=48)
    alone = [llm.generate("A film:", greedy, response_format=schema),
             llm.generate("A film:", sampled, response_format=schema),
             llm.generate("A film:", greedy), llm.generate("Zip:", sampled, regex="[0-9]{5}")]
    engine = Engine(llm.model, llm.tokenizer, llm.stop_token_ids, 256, max_batch=8)
    try:
        ids_film, ids_zip = llm.prompt_ids("A film:"), llm.prompt_ids("Zip:")
        rules = llm.output_rules(response_format=schema)
        batched = run_all(engine, [(ids_film, greedy, rules), (ids_film, sampled, rules),
                                        (ids_film, greedy, None), (ids_zip, sampled, llm.output_rules(regex="[0-9]{5}"))])
    finally:
        engine.shutdown()
    for a, b in zip(alone, batched):
        assert a.token_ids == b.token_ids
    assert alone[0].token_ids != alone[2].token_ids  # the constraint changed the output: the check has teeth


def test_forced_tokens_are_not_sampled(llm) -> None:
    """Where the grammar allows one continuation (a const key, a fixed separator), the tokens come without
    sampling: a schema of constants is generated whole, and greedy and sampled runs agree on them."""
    schema = obj({"kind": {"const": "invoice"}, "currency": {"const": "EUR"}, "total": {"type": "integer",
                                                                                      "minimum": 0, "maximum": 9}})
    constraint = llm.output_rules(response_format=schema).constraint(llm.tokenizer, llm.stop_token_ids,
                                                                     llm.config.vocab_size)
    assert llm.tokenizer.decode(constraint.forced_tokens()) == ""  # before the first token: nothing taken yet
    constraint.accept(llm.tokenizer.encode("{")[0])
    assert llm.tokenizer.decode(constraint.forced_tokens()) == '"kind": "invoice", "currency": "EUR", "total": '
    c = llm.generate("Invoice:", response_format=schema, temperature=1.0, seed=5)
    value = json.loads(c.text)
    assert value["kind"] == "invoice" and value["currency"] == "EUR" and 0 <= value["total"] <= 9


def test_logprobs_leave_constrained_tokens_unchanged(llm) -> None:
    """With logprobs on, forced tokens come one per step (each with its logprob) instead of in a run; neither way
    draws for them, so a seeded sampled answer is the same token for token."""
    schema = SCHEMAS["mixed_record"]
    plain = llm.generate("A film:", response_format=schema, temperature=0.9, seed=2, max_tokens=48)
    scored = llm.generate("A film:", response_format=schema, temperature=0.9, seed=2, max_tokens=48, logprobs=0)
    assert plain.token_ids == scored.token_ids
    assert [lp.token_id for lp in scored.logprobs] == scored.token_ids
