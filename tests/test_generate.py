"""Generation API: finish reasons, stop strings, streaming, context limits, prompt forms."""

from __future__ import annotations

import pytest

from gemmakit.errors import ContextLengthError, InvalidParameterError
from gemmakit.generate import StopStringMatcher

PROMPT = "Explain quantum computing in simple terms:"


def test_max_tokens_gives_length(llm) -> None:
    out = llm.generate(PROMPT, max_tokens=5, temperature=0)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 5
    assert out.usage.prompt_tokens == len(llm.tokenizer.encode(PROMPT, add_bos=True))
    assert out.usage.completion_tokens == 5 and out.usage.total_tokens == out.usage.prompt_tokens + 5
    assert out.text == llm.tokenizer.decode(out.token_ids)


def test_stream_reassembles_to_generate(llm) -> None:
    full = llm.generate(PROMPT, max_tokens=40, temperature=0)
    events = list(llm.stream(PROMPT, max_tokens=40, temperature=0))
    assert "".join(e.text for e in events) == full.text
    assert [e.token_id for e in events] == full.token_ids
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].finish_reason == "length"


def test_stop_string_cuts_text(llm) -> None:
    full = llm.generate(PROMPT, max_tokens=40, temperature=0)
    stop = "quantum computing?"
    assert stop in full.text, full.text
    out = llm.generate(PROMPT, max_tokens=40, temperature=0, stop=[stop, "never-appears"])
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    streamed = "".join(e.text for e in llm.stream(PROMPT, max_tokens=40, temperature=0, stop=stop))
    assert streamed == out.text


def test_stop_string_matcher_holds_back_prefixes() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("OX") == ("STOX", False)
    assert m.feed("yy S") == ("yy ", False)
    assert m.feed("TOP and more") == ("", True)


def test_stop_token_ends_generation(llm) -> None:
    """Generation ends on a stop token with finish 'stop'; the token is reported but is not content.

    The bundled base model rarely predicts <eos>/<end_of_turn> on its own, so the stop set here is the token
    greedy decoding produces third; LLM.stop_token_ids (tested in test_chat) feeds the same mechanism.
    """
    from gemmakit.generate import collect, generate_events
    from gemmakit.sampling import SamplingParams

    ids = llm.tokenizer.encode(PROMPT, add_bos=True)
    free = llm.generate(ids, max_tokens=8, temperature=0)
    stop_id = free.token_ids[2]
    assert stop_id not in free.token_ids[:2]
    params = SamplingParams(max_tokens=8, temperature=0)
    events = list(generate_events(llm.model, llm.tokenizer, ids, params, [stop_id], llm.context_length))
    assert [e.stop_token for e in events] == [False, False, True]
    assert events[-1].token_id == stop_id and events[-1].finish_reason == "stop"
    out = collect(iter(events), len(ids), False)
    assert out.token_ids == free.token_ids[:2] and out.finish_reason == "stop"
    assert out.text == llm.tokenizer.decode(free.token_ids[:2])
    ignored = list(generate_events(llm.model, llm.tokenizer, ids, SamplingParams(max_tokens=8, temperature=0,
                                                                                  ignore_eos=True), [stop_id],
                                   llm.context_length))
    assert [e.token_id for e in ignored] == free.token_ids and ignored[-1].finish_reason == "length"


def test_token_id_prompt_equals_text_prompt(llm) -> None:
    ids = llm.tokenizer.encode(PROMPT, add_bos=True)
    assert llm.generate(ids, max_tokens=8, temperature=0).token_ids == llm.generate(
        PROMPT, max_tokens=8, temperature=0
    ).token_ids


def test_chat_multi_turn_generates(llm) -> None:
    messages = [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Now say goodbye."},
    ]
    out = llm.chat(messages, max_tokens=8, temperature=0)
    streamed = "".join(e.text for e in llm.chat_stream(messages, max_tokens=8, temperature=0))
    assert out.text == streamed and out.usage.prompt_tokens == len(llm.apply_chat_template(messages, tokenize=True))


def test_context_overflow_is_a_clear_error(model_path) -> None:
    import gemmakit

    small = gemmakit.load(model_path, context_length=32)
    long_prompt = "word " * 40
    with pytest.raises(ContextLengthError, match=r"prompt of \d+ tokens"):
        small.generate(long_prompt, max_tokens=1)
    with pytest.raises(ContextLengthError, match="at most 22 new tokens fit"):
        small.generate([2] + [1000] * 9, max_tokens=30)
    assert len(small.generate([2] + [1000] * 9, max_tokens=22, ignore_eos=True, temperature=0).token_ids) == 22


@pytest.mark.parametrize("prompt", [[], [2, -1], [2, 10**9], [2, "x"]])
def test_bad_prompt_ids(llm, prompt) -> None:
    with pytest.raises(InvalidParameterError):
        llm.generate(prompt, max_tokens=1)


def _reference_cut(text: str, stops: list[str]) -> str | None:
    """The text before the earliest stop string (brute force), or None when none occurs."""
    hits = [text.find(s) for s in stops if s in text]
    return text[: min(hits)] if hits else None


def test_stop_string_matcher_agrees_with_brute_force() -> None:
    """Random texts fed in random pieces: the output stops as soon as a stop string is complete in the text fed
    so far, exactly where str.find over every stop string cuts that text; with no stop string, all text comes out."""
    import random

    rng = random.Random(0)
    for _ in range(500):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 6))]
        text = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 30)))
        m, out, hit, fed, before = StopStringMatcher(stops), "", False, 0, 0
        while fed < len(text) and not hit:
            before, fed = fed, fed + rng.randint(1, 4)
            emitted, hit = m.feed(text[before:fed])
            out += emitted
        if hit:
            assert _reference_cut(text[:before], stops) is None, (stops, text)  # not found too late
            assert out == _reference_cut(text[:fed], stops), (stops, text, out)
        else:
            assert out + m.flush() == text and _reference_cut(text, stops) is None, (stops, text)
