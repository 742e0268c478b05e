"""Structured outputs and tool calls over HTTP, with the official openai client against a real server running the
default model: response_format (json_object, json_schema), vLLM's structured_outputs on both endpoints, the SDK's
``.parse``, tool calls (required, a named function) plain and streamed, and 400s that name the problem."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from gemmakit.server import create_app
from serving import Server

MODEL = "gemma-3-270m"
FILM = {"type": "object", "additionalProperties": False, "required": ["title", "year"],
        "properties": {"title": {"type": "string", "maxLength": 24},
                       "year": {"type": "integer", "minimum": 1900, "maximum": 2100}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
SEARCH = {"type": "function", "function": {
    "name": "web.search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 24}},
                   "required": ["query"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(llm):
    with Server(create_app(llm, model_name=MODEL)) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_json_schema_plain_and_streamed(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "film", "schema": FILM, "strict": True}}
    messages = [{"role": "user", "content": "A film as JSON."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, response_format=fmt, temperature=0,
                                           max_tokens=64)
    assert plain.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(plain.choices[0].message.content), FILM)
    chunks = client.chat.completions.create(model=MODEL, messages=messages, response_format=fmt, temperature=0,
                                            max_tokens=64, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content


def test_json_object_and_sampled_choices_validate(client) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": 'Reply with a JSON object with the key "ok".'}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=64)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A film as JSON."}], n=4, seed=1, temperature=1.0,
        max_tokens=64, response_format={"type": "json_schema", "json_schema": {"name": "film", "schema": FILM}})
    finished = [c for c in r.choices if c.finish_reason == "stop"]
    assert len(finished) >= 2
    for c in finished:
        jsonschema.validate(json.loads(c.message.content), FILM)


def test_structured_outputs_on_completions_and_chat(client) -> None:
    r = client.completions.create(model=MODEL, prompt="A film:", max_tokens=64, temperature=0,
                                  extra_body={"structured_outputs": {"json": FILM}})
    jsonschema.validate(json.loads(r.choices[0].text), FILM)
    r = client.completions.create(model=MODEL, prompt="Zip code:", max_tokens=8, temperature=0.7, seed=2,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{5}"}})
    assert re.fullmatch("[0-9]{5}", r.choices[0].text)
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8,
                                       extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
    assert r.choices[0].message.content in ("sunny", "rainy")


def test_sdk_parse_with_a_pydantic_model(client) -> None:
    class City(BaseModel):
        name: str = Field(max_length=20)
        population: int = Field(ge=0, le=10**9)

    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A city as JSON."}],
                                      response_format=City, temperature=0, max_tokens=64)
    assert isinstance(r.choices[0].message.parsed, City)


def check_calls(calls, allowed: dict) -> None:
    """Each call names an allowed tool and its JSON arguments validate against that tool's schema."""
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        schema = allowed[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_tool_calls_required_and_named(client) -> None:
    tools = {"get_weather": WEATHER, "web.search": SEARCH}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, SEARCH], tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    assert not choice.message.content
    check_calls(choice.message.tool_calls, tools)
    named = {"type": "function", "function": {"name": "web.search"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, SEARCH], tool_choice=named,
                                       parallel_tool_calls=False, temperature=0.8, seed=4, max_tokens=96)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == ["web.search"]
    check_calls(calls, tools)


def test_tool_calls_streamed_as_deltas(client) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                                 parallel_tool_calls=False, temperature=0, max_tokens=64,
                                                 stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not "".join(d.content or "" for d in deltas)  # no call text leaks into content
    pieces = [t for d in deltas for t in d.tool_calls or []]
    assert pieces[0].id and pieces[0].function.name == "get_weather" and pieces[0].index == 0
    arguments = "".join(p.function.arguments or "" for p in pieces)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    plain = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=64)
    assert plain.choices[0].message.tool_calls[0].function.arguments == arguments


@pytest.mark.parametrize("extra,fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "invalid json schema"),
    ({"structured_outputs": {"regex": "(["}}, "invalid regex"),
    ({"structured_outputs": {"grammar": "start: nothing_here"}}, "nothing_here"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "not both"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
])
def test_bad_constraints_are_400s_that_name_the_problem(client, extra, fragment) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, extra_body=extra)
    assert fragment in caught.value.body["message"]
