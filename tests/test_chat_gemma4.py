"""Gemma 4 chat: rendering token-exact against the reference template in ../shared, and output parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gemmakit.chat import segments_to_ids, segments_to_text
from gemmakit.chat_gemma4 import Gemma4ChatFormat, Gemma4OutputParser, parse_output
from gemmakit.tokenizer import CONTROL, USER_DEFINED, Tokenizer
from gemmakit.weights.gguf import GGUFFile

TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "chat-templates" / "gemma4.jinja"

# Gemma 4 control pieces; the test vocabulary puts them on Gemma 3's turn ids (same as Gemma 4's 105/106) and
# on unused slots. Types follow llama.cpp's Gemma 4 conversion (channel/tool-call/quote pieces user-defined).
G4_PIECES = {105: ("<|turn>", CONTROL), 106: ("<turn|>", CONTROL), 6: ("<|think|>", CONTROL),
             7: ("<|channel>", USER_DEFINED), 8: ("<channel|>", USER_DEFINED), 9: ("<|tool>", CONTROL),
             10: ("<tool|>", CONTROL), 11: ("<|tool_call>", USER_DEFINED), 12: ("<tool_call|>", USER_DEFINED),
             13: ("<|tool_response>", USER_DEFINED), 14: ("<tool_response|>", USER_DEFINED),
             15: ('<|"|>', USER_DEFINED)}


def gemma4_test_tokenizer(model_path) -> Tokenizer:
    meta = GGUFFile(model_path).metadata
    pieces, types = list(meta["tokenizer.ggml.tokens"]), [int(t) for t in meta["tokenizer.ggml.token_type"]]
    for i, (piece, kind) in G4_PIECES.items():
        pieces[i], types[i] = piece, kind
    return Tokenizer(pieces, [float(s) for s in meta["tokenizer.ggml.scores"]], types)


@pytest.fixture(scope="module")
def tok(model_path) -> Tokenizer:
    return gemma4_test_tokenizer(model_path)


@pytest.fixture(scope="module")
def template():
    if not TEMPLATE_PATH.is_file():
        pytest.fail(f"reference template missing: {TEMPLATE_PATH} (CI has ../shared beside the checkout)")

    def raise_exception(msg):
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(TEMPLATE_PATH.read_text())


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "description": "Forecast days"},
                "detailed": {"type": "boolean"},
                "coords": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                           "required": ["lat"]},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {"type": "function", "function": {"name": "search", "description": "Web search.",
                                                "parameters": {"type": "object",
                                                               "properties": {"q": {"type": "string"}},
                                                               "required": ["q"]}}}
CALL_ARGS = {"city": "Paris", "days": 3, "detailed": True, "coords": {"lat": 48.85, "lon": 2.35}, "tags": ["a", "b"]}

CASES = {
    "plain": dict(messages=[{"role": "user", "content": "Hello there!"}]),
    "system": dict(messages=[{"role": "system", "content": "  You are terse. "}, {"role": "user", "content": "Hi"}]),
    "multi_turn": dict(messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<|channel>thought\nsimple<channel|>4"},
        {"role": "user", "content": "And 3+3?\n"},
    ]),
    "thinking_on": dict(messages=[{"role": "user", "content": "Why is the sky blue?"}], enable_thinking=True),
    "thinking_on_system": dict(messages=[{"role": "system", "content": "Be precise."},
                                         {"role": "user", "content": "Why?"}], enable_thinking=True),
    "tools_call_result": dict(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": CALL_ARGS}}]},
            {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"temp": 21, "sky": "clear"})},
        ],
        tools=[WEATHER_TOOL, SEARCH_TOOL],
    ),
}


def reference_messages(messages):
    """The same conversation in the reference template's shape: results as tool_responses on the call turn."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            host = out[-1]
            name = next(c["function"]["name"] for c in host["tool_calls"] if c["id"] == m["tool_call_id"])
            host.setdefault("tool_responses", []).append({"name": name, "response": json.loads(m["content"])})
        else:
            out.append(dict(m))
    return out


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("gen", [True, False])
def test_rendering_matches_reference(tok, template, name, gen) -> None:
    case = CASES[name]
    kwargs = {"tools": case.get("tools"), "enable_thinking": case.get("enable_thinking", False)}
    ref_text = template.render(messages=reference_messages(case["messages"]), bos_token="<bos>",
                               add_generation_prompt=gen, **kwargs)
    segments = Gemma4ChatFormat().render(case["messages"], gen, **kwargs)
    assert segments_to_text(segments) == ref_text
    assert segments_to_ids(segments, tok) == tok.encode(ref_text, parse_special=True)


def test_openai_string_arguments_render_like_objects(tok) -> None:
    as_object = CASES["tools_call_result"]["messages"]
    as_string = json.loads(json.dumps(as_object))
    as_string[1]["tool_calls"][0]["function"]["arguments"] = json.dumps(CALL_ARGS)
    fmt = Gemma4ChatFormat()
    assert segments_to_text(fmt.render(as_string, tools=[WEATHER_TOOL])) == segments_to_text(
        fmt.render(as_object, tools=[WEATHER_TOOL]))


MODEL_OUTPUT = (
    "<|channel>thought\nThe user wants weather; call the tool.<channel|>"
    "Let me check.<|tool_call>call:get_weather{city:<|\"|>Paris, FR<|\"|>,coords:{lat:48.85,lon:2.35},"
    "days:3,detailed:true,tags:[<|\"|>a<|\"|>,<|\"|>b{c}<|\"|>],note:<|\"|><|\"|>}<tool_call|>"
    "<|tool_call>call:search{q:<|\"|>x,y:z<|\"|>}<tool_call|><turn|>"
)


def test_parse_thinking_content_and_tool_calls() -> None:
    out = parse_output(MODEL_OUTPUT)
    assert out.reasoning == "The user wants weather; call the tool."
    assert out.content == "Let me check."
    assert out.tool_calls == [
        {"name": "get_weather", "arguments": {"city": "Paris, FR", "coords": {"lat": 48.85, "lon": 2.35}, "days": 3,
                                              "detailed": True, "tags": ["a", "b{c}"], "note": ""}},
        {"name": "search", "arguments": {"q": "x,y:z"}},
    ]


def test_streaming_parse_equals_whole_parse(tok) -> None:
    ids = tok.encode(MODEL_OUTPUT)
    parser = Gemma4OutputParser()
    content, reasoning = "", ""
    for i in ids:  # one token at a time
        c, r = parser.feed(tok.decode([i]))
        content, reasoning = content + c, reasoning + r
    result = parser.finish()
    whole = parse_output(MODEL_OUTPUT)
    assert result == whole
    assert content == whole.content and reasoning == whole.reasoning


def test_thinking_never_empties_the_answer() -> None:
    out = parse_output("<|channel>thought\nhmm<channel|>The answer is 4.<turn|>")
    assert out.reasoning == "hmm" and out.content == "The answer is 4."
    plain = parse_output("The answer is 4.")
    assert plain.reasoning == "" and plain.content == "The answer is 4."


def test_tolerant_tool_call_parsing() -> None:
    """Calls as models really write them: Python or JSON quotes instead of <|"|>, namespaced names, quoted keys."""
    out = parse_output("<|tool_call>call:ns:web:search{query:'cats',\"limit\":3,'safe':true}<tool_call|>")
    assert out.tool_calls == [{"name": "ns:web:search", "arguments": {"query": "cats", "limit": 3, "safe": True}}]
    broken = parse_output("Sure.<|tool_call>call:search{q:<|\"|>unterminated<tool_call|>")
    assert broken.tool_calls == [] and "unterminated" in broken.content  # kept as text, never dropped
    assert not any(m in broken.content for m in ("<|tool_call>", "<tool_call|>", '<|"|>'))  # but not its markup


def test_arguments_are_coerced_to_the_schema() -> None:
    from gemmakit.structured.tools import coerce_arguments

    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "integer"}},
                                               "opts": {"type": "object"}, "n": {"type": "integer"},
                                               "x": {"type": "number"}, "ok": {"type": "boolean"},
                                               "name": {"type": "string"}}}
    args = {"tags": "[1, 2]", "opts": '{"a": 1}', "n": "7", "x": "2.5", "ok": "true", "name": "42", "extra": "1"}
    assert coerce_arguments(args, schema) == {"tags": [1, 2], "opts": {"a": 1}, "n": 7, "x": 2.5, "ok": True,
                                              "name": "42", "extra": "1"}
    assert coerce_arguments({"n": "seven"}, schema) == {"n": "seven"}  # left as it was when it does not convert


def test_reasoning_effort_maps_onto_budgets() -> None:
    from gemmakit.structured.plan import thinking_budget

    assert thinking_budget(None, None) == (None, None)
    assert thinking_budget(100, None) == (None, 100)
    assert thinking_budget(None, "none") == (False, None)
    assert thinking_budget(None, "low") == (True, 1024)
    assert thinking_budget(None, "high") == (True, None)
    assert thinking_budget(50, "medium") == (True, 50)  # an explicit budget wins
