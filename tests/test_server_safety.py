"""The safety layer in the server: /v1/moderations through the openai client, a policy that blocks input and one
that redacts it, and output moderation (whole and streamed) where the model is forced to say a flagged word."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import httpx
import openai
import pytest

from gemmakit.safety import SafetyPolicy
from gemmakit.server import create_app
from serving import Server

ZEBRA = 78328  # " zebra" in the default model's vocabulary; the policies below flag it as violence
FORCE_ZEBRA = {str(ZEBRA): 100}
POLICY = {
    "input": {"guards": ["pii", "classifier"], "action": "block", "actions": {"pii": "redact"}},
    "output": {"guards": ["classifier"], "action": "block"},
    "classifier": {"words": {"violence": ["zebra"]}},
}


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def plain(llm):
    with Server(create_app(llm, max_batch=2, kv_cache_bytes=256 << 20)) as s:
        yield s


@pytest.fixture(scope="module")
def guarded(llm):
    app = create_app(llm, max_batch=2, kv_cache_bytes=256 << 20, log_prompts=True,
                     safety=SafetyPolicy.from_mapping(POLICY), safety_window=16)
    with Server(app) as s:
        yield s


def test_moderations_through_the_openai_client(plain) -> None:
    client = _client(plain)
    result = client.moderations.create(input=["Mail me at ann@example.com", "Have a nice day.",
                                              "I am going to kill you"])
    pii, calm, threat = result.results
    assert result.id.startswith("modr-") and len(result.results) == 3
    assert pii.flagged and pii.categories.model_extra["pii"] is True
    assert pii.category_scores.model_extra["pii"] == 1.0
    assert not calm.flagged and calm.category_scores.harassment < 0.5
    assert threat.flagged and threat.categories.harassment_threatening and threat.categories.harassment
    one = client.moderations.create(input="you are a stupid idiot").results[0]
    assert one.flagged and one.categories.harassment and one.category_scores.harassment > 0.9


@pytest.mark.parametrize("body, fragment", [
    ({"input": []}, "at least one text"),
    ({"input": ["x"] * 257}, "at most 256"),
    ({"input": [{"type": "image_url", "image_url": {"url": "http://x"}}]}, "invalid request"),
    ({}, "input"),
])
def test_bad_moderation_requests_are_400(plain, body, fragment) -> None:
    r = httpx.post(plain.url + "/v1/moderations", json=body, timeout=30)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]


def test_policy_blocks_input(guarded) -> None:
    client = _client(guarded)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "how do i make a bomb"}],
                                       max_tokens=4)
    assert info.value.code == "content_policy_violation" and "illicit" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="how do i make a bomb", max_tokens=4)
    assert info.value.code == "content_policy_violation"


def test_policy_redacts_input(guarded, caplog) -> None:
    client = _client(guarded)
    echo = client.completions.create(model="m", prompt="Write to ann@example.com or +1 (415) 555-2671 about",
                                     max_tokens=2, echo=True, temperature=0).choices[0].text
    assert echo.startswith("Write to <EMAIL_1> or <PHONE_1> about")  # the prompt the model saw
    def logged_messages() -> list:
        logged = [json.loads(r.getMessage()) for r in caplog.records if r.getMessage().startswith("{")]
        return [line["messages"] for line in logged if "messages" in line]

    with caplog.at_level(logging.INFO, logger="gemmakit.server"):
        client.chat.completions.create(model="m", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "text", "text": "My card is 4111 1111 1111 1111."}]}])
        # The request's log line is written once its last byte is sent: the client may have the answer first.
        deadline = time.time() + 10
        while not logged_messages() and time.time() < deadline:
            time.sleep(0.02)
    messages = logged_messages()[-1]
    assert messages[0]["content"][0]["text"] == "My card is <CARD_1>."
    assert "4111" not in caplog.text


def test_flagged_answer_is_filtered(guarded) -> None:
    client = _client(guarded)
    choice = client.completions.create(model="m", prompt="Animals:", max_tokens=12, temperature=0,
                                       logit_bias=FORCE_ZEBRA).choices[0]
    assert choice.finish_reason == "content_filter" and "zebra" not in choice.text
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Name animals."}],
                                          max_tokens=12, temperature=0, logit_bias=FORCE_ZEBRA).choices[0]
    assert chat.finish_reason == "content_filter" and chat.message.content is None


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streamed_flagged_word_never_reaches_the_client(guarded, endpoint) -> None:
    client = _client(guarded)
    # A few free tokens first, then the forced word: the stream has released text before the violation.
    kw = dict(model="m", max_tokens=40, temperature=0, logit_bias=FORCE_ZEBRA, stream=True)
    if endpoint == "completions":
        chunks = list(client.completions.create(prompt="Animals:", **kw))
        texts = [c.choices[0].text for c in chunks]
    else:
        chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "Name animals."}], **kw))
        texts = [c.choices[0].delta.content or "" for c in chunks]
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert "zebra" not in "".join(texts).lower()


def test_streamed_answer_passes_whole_when_clean(guarded) -> None:
    client = _client(guarded)
    kw = dict(model="m", prompt="The capital of France is", max_tokens=40, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "length"
    # Released a checked window at a time, cut at whitespace: far fewer chunks than tokens.
    assert all(c.choices[0].text[-1:].isspace() for c in chunks[:-1]) and len(chunks) < 20


def test_streamed_logprobs_are_refused_with_output_guards(guarded) -> None:
    with pytest.raises(openai.BadRequestError, match="output guards"):
        list(_client(guarded).completions.create(model="m", prompt="Hi", max_tokens=2, logprobs=1, stream=True))


def test_safety_metrics(guarded) -> None:
    client = _client(guarded)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt="how do i make a bomb", max_tokens=2)
    text = httpx.get(guarded.url + "/metrics", timeout=30).text
    assert 'gemmakit_safety_flags_total{category="illicit",direction="input"}' in text
    assert 'gemmakit_safety_actions_total{action="block",category="illicit",direction="input"}' in text


def test_serve_refuses_a_bad_policy_before_loading(tmp_path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text('[input]\nguards = ["nsfw"]\n')
    proc = subprocess.run([sys.executable, "-m", "gemmakit.cli", "serve", "--safety", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown guard 'nsfw'" in proc.stderr and "Traceback" not in proc.stderr
