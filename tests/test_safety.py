"""The safety layer without a server: PII recognizers on a labelled set, redaction and restore, the classifier,
the policy file, and the streamed-output gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemmakit.safety import (CATEGORIES, ClassifierGuard, PIIGuard, Redactor, Safety, SafetyPolicy,
                             SafetyPolicyError)
from gemmakit.safety.stream import OutputGate

# (text, the items that must be found as [kind, exact text]); no items: a look-alike that must not match. The same
# set gives benchmarks/safety.py's precision and recall.
LABELLED_PII = [(text, [tuple(item) for item in items]) for text, items in json.loads(
    (Path(__file__).parent / "data" / "safety_labelled.json").read_text(encoding="utf-8"))["pii"]]
# What the recognizers are known to miss (the README says so); strict: the day one is found, this fails.
KNOWN_MISSES = {"reach me at john dot doe at example dot com": "emails written out in words are not recognized"}


@pytest.fixture(scope="module")
def pii() -> PIIGuard:
    return PIIGuard()


@pytest.mark.parametrize("text, expected", [
    pytest.param(t, e, id=t[:30], marks=[pytest.mark.xfail(strict=True, reason=KNOWN_MISSES[t])] if t in KNOWN_MISSES
                 else []) for t, e in LABELLED_PII])
def test_pii_recognizers_on_labelled_set(pii, text, expected) -> None:
    found = [(s.kind, text[s.start:s.end]) for s in pii.find(text)]
    assert found == expected


def test_pii_verdict_scores_the_pii_category(pii) -> None:
    assert pii.check("ann@example.com", "input").scores == {"pii": 1.0}
    assert pii.check("nothing personal here", "input").scores == {"pii": 0.0}


def test_redaction_uses_typed_placeholders_and_restores(pii) -> None:
    texts = ["Mail ann@example.com or call +1 (415) 555-2671", "again: ann@example.com, and bob@example.org"]
    redactor = Redactor()
    redacted = [redactor.redact(t, pii.find(t)) for t in texts]
    assert redacted == ["Mail <EMAIL_1> or call <PHONE_1>", "again: <EMAIL_1>, and <EMAIL_2>"]
    assert [redactor.restore(r) for r in redacted] == texts
    assert redactor.restore("<EMAIL_9> is not ours") == "<EMAIL_9> is not ours"


@pytest.mark.parametrize("pieces", [["Write to <EMA", "IL_1> now"], ["Write to <", "EMAIL_", "1", "> now"],
                                    ["Write to <EMAIL_1> now"], ["W", "rite to <EMAIL_1", "> now"]])
def test_streamed_restore_never_splits_a_placeholder(pieces) -> None:
    redactor = Redactor()
    redactor.placeholder("EMAIL", "ann@example.com")
    restorer = redactor.streaming()
    out = [restorer.feed(p) for p in pieces] + [restorer.finish()]
    assert "".join(out) == "Write to ann@example.com now"
    assert not any("<" in o or "EMAIL" in o for o in out)


def test_streamed_restore_passes_other_angle_brackets() -> None:
    redactor = Redactor()
    redactor.placeholder("EMAIL", "ann@example.com")
    restorer = redactor.streaming()
    assert restorer.feed("a <b> c <") + restorer.feed("x> d") + restorer.finish() == "a <b> c <x> d"


def test_classifier_scores_categories() -> None:
    guard = ClassifierGuard(words={"violence": ["zebra stampede"]})
    assert guard.check("you are a stupid idiot", "input").scores["harassment"] > 0.9
    calm = guard.check("What is the capital of France?", "input").scores
    assert max(calm.values()) < 0.2
    threat = guard.check("I am going to kill you", "input").scores
    assert threat["harassment/threatening"] == 1.0 and threat["harassment"] == 1.0  # a threat is harassment
    custom = guard.check("Beware the Zebra Stampede!", "output")
    assert custom.scores["violence"] == 1.0
    assert [(s.kind, "Beware the Zebra Stampede!"[s.start:s.end]) for s in custom.spans] == \
        [("violence", "Zebra Stampede")]


def test_moderation_result_has_every_category() -> None:
    result = Safety().moderate("mail me at ann@example.com")
    assert set(result["categories"]) == set(CATEGORIES) == set(result["category_scores"])
    assert result["flagged"] and result["categories"]["pii"] and not result["categories"]["harassment"]
    assert not Safety().moderate("Have a nice day.")["flagged"]


def test_policy_decisions_block_redact_flag() -> None:
    policy = SafetyPolicy.from_mapping({"input": {"guards": ["pii", "classifier"], "action": "block",
                                                  "actions": {"pii": "redact"},
                                                  "thresholds": {"harassment": 0.95}}})
    safety = Safety(policy)
    d = safety.decide(["Mail ann@example.com", "call +1 (415) 555-2671"], "input")
    assert d.flagged == ["pii"] and d.blocked == [] and d.texts == ["Mail <EMAIL_1>", "call <PHONE_1>"]
    d = safety.decide(["how do i make a bomb"], "input")
    assert d.blocked == ["illicit", "illicit/violent"]
    flag_only = Safety(SafetyPolicy.from_mapping({"input": {"guards": ["classifier"], "action": "flag"}}))
    d = flag_only.decide(["how do i make a bomb"], "input")
    assert d.flagged == ["illicit", "illicit/violent"] and d.blocked == [] and d.texts == ["how do i make a bomb"]


def test_policy_file_toml_and_yaml(tmp_path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text('[input]\nguards = ["pii"]\naction = "flag"\n[input.thresholds]\nharassment = 0.8\n'
                    '[classifier.words]\nviolence = ["zebra"]\n')
    p = SafetyPolicy.from_file(toml)
    assert p.input.guards == ("pii",) and p.input.action("pii") == "flag"
    assert p.input.threshold("harassment/threatening") == 0.8 and p.input.threshold("hate") == 0.5
    yaml = tmp_path / "p.yaml"
    yaml.write_text("output:\n  guards: [classifier]\n  action: block\n")
    assert SafetyPolicy.from_file(yaml).output.guards == ("classifier",)


@pytest.mark.parametrize("data, fragment", [
    ({"input": {"guards": ["nsfw"]}}, "unknown guard 'nsfw'"),
    ({"input": {"actions": {"harassment": "redact"}}}, "only pii can be redacted"),
    ({"input": {"thresholds": {"hate": 2}}}, "a threshold is in [0, 1]"),
    ({"input": {"thresholds": {"hateful": 0.5}}}, "unknown category 'hateful'"),
    ({"input": {"action": "delete"}}, "the actions are block, redact, flag"),
    ({"inputs": {}}, "unknown key(s) inputs"),
    ({"output": {"actions": {"pii": "redact"}}}, "an answer is checked, not rewritten"),
    ({"classifier": {"patterns": {"violence": ["(unclosed"]}}}, "is not a regular expression"),
])
def test_bad_policies_are_refused_with_the_key(data, fragment) -> None:
    with pytest.raises(SafetyPolicyError, match=None) as info:
        Safety(SafetyPolicy.from_mapping(data))
    assert fragment in str(info.value)


def test_bad_policy_files(tmp_path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text("[input\n")
    with pytest.raises(SafetyPolicyError, match="not valid TOML"):
        SafetyPolicy.from_file(bad)
    with pytest.raises(SafetyPolicyError, match="cannot read"):
        SafetyPolicy.from_file(tmp_path / "missing.toml")
    (tmp_path / "p.json").write_text("{}")
    with pytest.raises(SafetyPolicyError, match=".toml or .yaml"):
        SafetyPolicy.from_file(tmp_path / "p.json")


def _gate(window: int) -> OutputGate:
    safety = Safety(SafetyPolicy.from_mapping({"output": {"guards": ["classifier"]},
                                               "classifier": {"words": {"violence": ["zebra"]}}}))
    return OutputGate(lambda texts: safety.decide(texts, "output"), window)


def test_output_gate_releases_only_checked_text() -> None:
    gate = _gate(16)
    released = []
    for piece in "The quick brown fox jumps over the lazy dog and runs away".split(" "):
        if gate.push(piece + " "):
            released.append(gate.check())
    released.append(gate.finish())
    assert "".join(released) == "The quick brown fox jumps over the lazy dog and runs away "
    assert all(r.endswith(" ") for r in released if r)  # words are never cut between two checks


def test_output_gate_drops_held_text_once_blocked() -> None:
    gate = _gate(16)
    released = []
    for piece in ["Animals I like: ", "the big", " ze", "bra and", " more text after it"]:
        if gate.push(piece):
            released.append(gate.check())
    released.append(gate.finish())
    assert gate.blocked == ["violence"]
    assert "ze" not in "".join(released) and "".join(released) == "Animals I like: "
    assert gate.push("anything") is False and gate.finish() == ""
