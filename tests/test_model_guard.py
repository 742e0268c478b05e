"""The model guard on a tiny random Gemma 2 GGUF (ShieldGemma is a Gemma 2 model): the prompts as the model cards
give them, P("Yes") from the shared-prefix batched pass equal to a full forward per policy, the Llama Guard path."""

from __future__ import annotations

import pytest
import torch

import gemmakit
from gemmakit.safety import Safety, SafetyPolicy, SafetyPolicyError
from gemmakit.safety.model_guard import (SHIELDGEMMA_POLICIES, ModelGuard, llama_guard_prompt, parse_llama_guard,
                                         shieldgemma_prompt)
from helpers import TINY, write_tiny_gguf

TEXT = "How do I pick the lock of my neighbour's door?"


@pytest.fixture(scope="module")
def guard_llm(tmp_path_factory):
    drop = tuple(f"blk.{i}.{n}.weight" for i in range(TINY["layers"]) for n in ("attn_q_norm", "attn_k_norm"))
    caps = {"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0}
    path = write_tiny_gguf(tmp_path_factory.mktemp("guard") / "g2.gguf", arch="gemma2", drop=drop, metadata=caps,
                           context=4096, seed=3)
    return gemmakit.load(path)


def test_shieldgemma_prompt_is_the_model_cards() -> None:
    policy = SHIELDGEMMA_POLICIES["harassment"][1]
    assert shieldgemma_prompt("Hi there", "input", policy) == (
        "You are a policy expert trying to help determine whether a user prompt is in violation of the defined "
        "safety policies.\n\n<start_of_turn>\nHuman Question: Hi there\n<end_of_turn>\n\n"
        "Our safety principle is defined in the below:\n\n"
        '* "No Harassment": The prompt shall not contain or seek generation of content that is malicious, '
        "intimidating, bullying, or abusive content targeting another individual (e.g., physical threats, denial "
        "of tragic events, disparaging victims of violence).\n\n"
        "Does the human question violate the above principle? Your answer must start with 'Yes' or 'No'. And then "
        "walk through step by step to be sure we answer correctly.\n")
    assert '"No Harassment": The chatbot shall not' in shieldgemma_prompt("x", "output", policy)
    assert "Chatbot Response: x\n" in shieldgemma_prompt("x", "output", policy)


def test_shieldgemma_scores_equal_a_full_forward_per_policy(guard_llm) -> None:
    guard = ModelGuard(guard_llm)
    probs = guard.yes_probabilities(TEXT, "input")
    assert set(probs) == set(SHIELDGEMMA_POLICIES)
    tok = guard_llm.tokenizer
    yes, no = tok.encode("Yes")[0], tok.encode("No")[0]
    for name, (_, policy) in SHIELDGEMMA_POLICIES.items():
        prompt = shieldgemma_prompt(TEXT, "input", policy)
        ids = guard.prompt_ids(prompt)
        assert tok.decode(ids) == "<bos>" + prompt and ids.count(tok.encode("<start_of_turn>", parse_special=True)[0]) == 1
        last = guard_llm.logits(ids)[-1]
        reference = torch.softmax(torch.stack([last[yes], last[no]]), dim=-1)[0].item()
        assert probs[name] == pytest.approx(reference, abs=2e-5)
    verdict = guard.check(TEXT, "input")
    assert verdict.scores == pytest.approx({"violence": probs["dangerous"], "harassment": probs["harassment"],
                                            "hate": probs["hate"], "sexual": probs["sexual"]})


def test_model_guard_from_a_policy(guard_llm, tmp_path) -> None:
    policy = SafetyPolicy.from_mapping({
        "input": {"guards": ["model"], "thresholds": {"default": 0.0}},
        "moderation": {"guards": ["model", "pii"]},
        "model_guard": {"path": "unused.gguf", "policies": {"locks": {"category": "illicit",
                                                                      "text": "{subject} shall not ask for burglary."}}},
    })
    safety = Safety(policy, guard_llm=guard_llm)
    result = safety.moderate(TEXT)
    p = ModelGuard(guard_llm, policies={"locks": ("illicit", "{subject} shall not ask for burglary.")}) \
        .yes_probabilities(TEXT, "input")["locks"]
    assert result["category_scores"]["illicit"] == pytest.approx(p, abs=1e-6)
    assert safety.decide([TEXT], "input").blocked == ["illicit"]  # threshold 0 flags any score
    with pytest.raises(SafetyPolicyError, match="needs a \\[model_guard\\] section"):
        SafetyPolicy.from_mapping({"input": {"guards": ["model"]}})
    with pytest.raises(SafetyPolicyError, match="give a category and a text"):
        SafetyPolicy.from_mapping({"model_guard": {"path": "x", "policies": {"a": {"text": "t"}}}})


def test_llama_guard_answers_parse() -> None:
    assert parse_llama_guard("unsafe\nS1,S10") == ["violence", "hate"]
    assert parse_llama_guard(" unsafe \n S11, S7 ") == ["self-harm", "pii"]
    assert parse_llama_guard("safe") == [] and parse_llama_guard("unsafe\nS99,X1") == []
    prompt = llama_guard_prompt("hello", "output", [("Violent Crimes", "violence"), ("Hate", "hate")])
    assert "S1: Violent Crimes.\nS2: Hate.\n" in prompt and "Agent: hello" in prompt


def test_llama_guard_path_scores_what_the_model_answers(guard_llm) -> None:
    guard = ModelGuard(guard_llm, style="llamaguard")
    verdict = guard.check(TEXT, "input")
    ids = guard.prompt_ids(llama_guard_prompt(TEXT, "input", __import__(
        "gemmakit.safety.model_guard", fromlist=["x"]).LLAMA_GUARD_CATEGORIES))
    answer = guard_llm.generate(ids, max_tokens=12, temperature=0.0).text
    assert set(verdict.scores) >= set(parse_llama_guard(answer))
    last = guard_llm.logits(ids)[-1]
    tok = guard_llm.tokenizer
    p_unsafe = torch.softmax(torch.stack([last[tok.encode("unsafe")[0]], last[tok.encode("safe")[0]]]), 0)[0].item()
    assert all(v == pytest.approx(p_unsafe, abs=2e-5) for v in verdict.scores.values())
