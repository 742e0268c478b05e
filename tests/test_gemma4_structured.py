"""Gemma 4 tool calls and thinking, served for real: a tiny Gemma 4 GGUF with random weights and a vocabulary
holding Gemma 4's control pieces, behind the HTTP server, read with the openai client.

Random weights write nothing sensible on their own; the constraints make valid tool calls and JSON by
construction, which is what these tests hold: the calls' arguments validate against the tools' schemas, the
thought channel streams apart as ``reasoning_content`` and closes when its budget is spent, the JSON schema applies
after it, and no markup ever reaches ``content``."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

import gemmakit
from gemmakit.server import create_app
from serving import Server
from test_families import VOCAB, build, gemma4, write_gemma4_gguf

MODEL = "tiny-gemma4"
G4_CONTROL = ["<|turn>", "<turn|>", "<|think|>", "<|tool>", "<tool|>"]
G4_MARKUP = ["<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
             '<|"|>']
MARKUP_TEXT = G4_CONTROL + G4_MARKUP
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
SEARCH = {"type": "function", "function": {
    "name": "ns:web:search", "description": "Search.",
    "parameters": {"type": "object", "required": ["query"], "properties": {
        "query": {"type": "string", "maxLength": 5}, "filters": {"type": "array", "maxItems": 2,
                                                                   "items": {"enum": ["news", "images"]}}}}}}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def gemma4_vocab(w) -> None:
    """Gemma 4's control and markup pieces (types as llama.cpp's conversion writes them), 256 byte pieces, filler
    words: VOCAB pieces in all."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + G4_CONTROL + G4_MARKUP
    types = [3, 3, 3, 2, 3] + [3] * len(G4_CONTROL) + [4] * len(G4_MARKUP)
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces += [f"w{i}" for i in range(VOCAB - len(pieces))]
    types += [1] * (VOCAB - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * len(pieces))
    w.add_token_types(types)


def long_context():
    """The tiny 31B-shaped config with room for prompts that declare tools (byte-level text is long)."""
    config = gemma4("31b")
    config.max_position_embeddings = 2048
    return config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma4")
    _, ref, hf_llm, _ = build("gemma4_31b", folder / "hf", factory=long_context)
    path = folder / "tiny-gemma4.gguf"
    write_gemma4_gguf(ref, hf_llm.config.layers, path, vocab=gemma4_vocab)
    return gemmakit.load(path)


@pytest.fixture(scope="module")
def client(tiny):
    with Server(create_app(tiny, model_name=MODEL, context_length=1024)) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def no_markup(text: str | None) -> None:
    assert not any(m in (text or "") for m in MARKUP_TEXT), text


def check_call(name: str, arguments: str) -> None:
    tool = {"get_weather": WEATHER, "ns:web:search": SEARCH}[name]
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_calls_stream_as_deltas(client, seed) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, SEARCH],
                                                 tool_choice="required", temperature=1.0, seed=seed, max_tokens=120,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    for d in deltas:
        no_markup(d.content)
    calls: dict[int, dict] = {}
    for piece in (p for d in deltas for p in d.tool_calls or []):
        call = calls.setdefault(piece.index, {"name": None, "arguments": ""})
        if piece.function.name:
            assert piece.id and call["name"] is None
            call["name"] = piece.function.name
        call["arguments"] += piece.function.arguments or ""
    assert calls and sorted(calls) == list(range(len(calls)))
    for call in calls.values():
        check_call(call["name"], call["arguments"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_named_tool_and_single_call_not_streamed(client) -> None:
    named = {"type": "function", "function": {"name": "ns:web:search"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, SEARCH], tool_choice=named,
                                       parallel_tool_calls=False, temperature=1.0, seed=3, max_tokens=120)
    message = r.choices[0].message
    no_markup(message.content)
    assert r.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
    assert message.tool_calls[0].function.name == "ns:web:search"
    check_call("ns:web:search", message.tool_calls[0].function.arguments)


def test_thinking_streams_apart_with_a_budget_then_the_schema_holds(client, tiny) -> None:
    """The thought channel is opened by a bias on its token (random weights would not choose it), runs free for
    its budget of 6 tokens (a smaller bias makes them a word: the channel cannot reopen inside itself), is closed by
    force; then the JSON schema holds the answer."""
    channel, word = tiny.tokenizer.token_id("<|channel>"), tiny.tokenizer.token_id("w7")
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Think, then answer in JSON."}],
                response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
                logit_bias={str(channel): 100, str(word): 50}, temperature=0.9, seed=5, max_tokens=80,
                extra_body={"enable_thinking": True, "max_reasoning_tokens": 6})
    chunks = list(client.chat.completions.create(stream=True, **body))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    no_markup(reasoning)
    no_markup(content)
    assert reasoning == "w7" * 6
    jsonschema.validate(json.loads(content), SCHEMA)
    plain = client.chat.completions.create(logprobs=True, **body)
    tokens = [t.token for t in plain.choices[0].logprobs.content]
    opened, closed = tokens.index("<|channel>"), tokens.index("<channel|>")
    assert closed - opened - 1 == 6  # the budget, spent, then the channel closed by force
    assert plain.choices[0].message.content == content
    assert plain.choices[0].message.model_extra["reasoning_content"] == reasoning


def test_thinking_off_never_opens_the_channel(client, tiny) -> None:
    channel = tiny.tokenizer.token_id("<|channel>")
    r = client.chat.completions.create(model=MODEL, messages=ASK, logit_bias={str(channel): 100}, temperature=0,
                                       max_tokens=20, logprobs=True)
    assert "<|channel>" not in [t.token for t in r.choices[0].logprobs.content]
    assert not (r.choices[0].message.model_extra or {}).get("reasoning_content")


def test_auto_tool_choice_is_free_until_the_model_opens_a_call(client, tiny) -> None:
    """``auto``: text runs free; the call token (favoured here by a bias, as random weights would rarely pick it)
    switches the tools' grammar on for that call, which then validates and comes back parsed, not as text. With
    parallel_tool_calls off the call token is banned after the first call, and the model's end-of-call token
    (<|tool_response>, favoured less) ends the answer."""
    call, response = tiny.tokenizer.token_id("<|tool_call>"), tiny.tokenizer.token_id("<|tool_response>")
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, SEARCH], temperature=1.0, seed=9,
                                       max_tokens=160, parallel_tool_calls=False,
                                       logit_bias={str(call): 100, str(response): 50})
    message = r.choices[0].message
    no_markup(message.content)
    assert r.choices[0].finish_reason == "tool_calls" and len(message.tool_calls) == 1
    for c in message.tool_calls:
        check_call(c.function.name, c.function.arguments)
    none = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, SEARCH], tool_choice="none",
                                          temperature=1.0, seed=9, max_tokens=20, logit_bias={str(call): 100})
    assert not none.choices[0].message.tool_calls  # "none": the call token cannot be picked
