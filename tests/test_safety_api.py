"""The safety policy through the Python API: gemmakit.load(..., safety=) and per-call safety=."""

from __future__ import annotations

import pytest

import gemmakit
from gemmakit.safety import ContentPolicyError, Safety, SafetyPolicy, SafetyPolicyError

ZEBRA = 78328  # " zebra"; the policy flags it as violence
POLICY = SafetyPolicy.from_mapping({
    "input": {"guards": ["pii", "classifier"], "actions": {"pii": "redact"}},
    "output": {"guards": ["classifier"]},
    "classifier": {"words": {"violence": ["zebra"]}},
})


@pytest.fixture(scope="module")
def safety() -> Safety:
    built = Safety(POLICY)
    built.warm_up()
    return built


def test_input_block_raises(llm, safety) -> None:
    with pytest.raises(ContentPolicyError, match="illicit") as info:
        llm.generate("how do i make a bomb", max_tokens=2, safety=safety)
    assert info.value.categories == ["illicit", "illicit/violent"] and info.value.role == "input"
    with pytest.raises(ContentPolicyError):
        llm.chat([{"role": "user", "content": "how do i make a bomb"}], max_tokens=2, safety=safety)


def test_input_redaction_is_what_the_model_reads(llm, safety) -> None:
    prompt = "Write to ann@example.com about"
    done = llm.generate(prompt, max_tokens=3, temperature=0, safety=safety)
    redacted = llm.generate("Write to <EMAIL_1> about", max_tokens=3, temperature=0)
    assert done.usage.prompt_tokens == redacted.usage.prompt_tokens
    assert done.token_ids == redacted.token_ids


def test_flagged_answer_is_filtered(llm, safety) -> None:
    done = llm.generate("Animals:", max_tokens=10, temperature=0, logit_bias={ZEBRA: 100}, safety=safety)
    assert done.finish_reason == "content_filter" and done.text == ""
    chat = llm.chat([{"role": "user", "content": "Name animals."}], max_tokens=10, temperature=0,
                    logit_bias={ZEBRA: 100}, safety=safety)
    assert chat.finish_reason == "content_filter" and chat.text == ""


@pytest.mark.parametrize("kind", ["stream", "chat_stream"])
def test_streamed_flagged_word_is_never_yielded(llm, safety, kind) -> None:
    kw = dict(max_tokens=40, temperature=0, logit_bias={ZEBRA: 100}, safety=safety)
    if kind == "stream":
        events = list(llm.stream("Animals:", **kw))
    else:
        events = list(llm.chat_stream([{"role": "user", "content": "Name animals."}], **kw))
    assert events[-1].finish_reason == "content_filter"
    assert "zebra" not in "".join(e.text + (e.content or "") for e in events).lower()


def test_clean_stream_is_the_whole_answer(llm, safety) -> None:
    kw = dict(max_tokens=40, temperature=0, safety=safety)
    whole = llm.generate("The capital of France is", **kw)
    events = list(llm.stream("The capital of France is", **kw))
    assert "".join(e.text for e in events) == whole.text and events[-1].finish_reason == "length"


def test_load_with_a_policy_file(tmp_path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[input]\nguards = ["classifier"]\n')
    llm = gemmakit.load(safety=policy)
    with pytest.raises(ContentPolicyError):
        llm.generate("how do i make a bomb", max_tokens=2)
    assert llm.generate("The sky is", max_tokens=2, temperature=0).finish_reason == "length"
    policy.write_text('[input]\nguards = ["nsfw"]\n')
    with pytest.raises(SafetyPolicyError, match="unknown guard 'nsfw'"):
        gemmakit.load(safety=policy)
