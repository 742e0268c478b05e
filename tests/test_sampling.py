"""Sampling: exact filter values, penalties, seeds, logprobs, parameter validation."""

from __future__ import annotations

import math

import pytest
import torch

from gemmakit.errors import InvalidParameterError
from gemmakit.sampling import SamplingParams, apply_penalties, filter_logits, token_logprob


NEUTRAL = {"top_k": 0, "top_p": 1.0}  # filters off (the defaults are Gemma's top_k=64, top_p=0.95)


def probs_after(logits, **kw) -> list[float]:
    p = torch.softmax(filter_logits(torch.tensor(logits), SamplingParams(**{**NEUTRAL, **kw})), dim=-1)
    return [round(float(x), 4) for x in p]


LOGITS = [math.log(x) for x in (0.1, 0.2, 0.3, 0.4)]


def test_temperature_only() -> None:
    assert probs_after(LOGITS) == [0.1, 0.2, 0.3, 0.4]
    # T = 0.5 squares the odds: p_i^2 / sum p_j^2
    assert probs_after(LOGITS, temperature=0.5) == [0.0333, 0.1333, 0.3, 0.5333]


def test_top_k() -> None:
    assert probs_after(LOGITS, top_k=2) == [0.0, 0.0, 0.4286, 0.5714]


def test_top_p() -> None:
    # 0.4 alone < 0.6, 0.4 + 0.3 >= 0.6: keep the two largest.
    assert probs_after(LOGITS, top_p=0.6) == [0.0, 0.0, 0.4286, 0.5714]
    assert probs_after(LOGITS, top_p=0.4) == [0.0, 0.0, 0.0, 1.0]
    assert probs_after(LOGITS, top_p=0.95) == [0.1, 0.2, 0.3, 0.4]


def test_min_p() -> None:
    # min_p 0.6 of the top probability 0.4 = 0.24: drops 0.1 and 0.2.
    assert probs_after(LOGITS, min_p=0.6) == [0.0, 0.0, 0.4286, 0.5714]


def test_penalties() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    seen = torch.tensor([True, True, False, True])
    counts = torch.tensor([0.0, 0.0, 0.0, 3.0])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), seen, counts)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.25]
    out = apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), seen, counts)
    assert out.tolist() == [2.0, -2.0, 1.0, 0.5 - 0.5 - 0.75]


def test_logit_bias_adds_to_the_named_tokens() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    none = torch.zeros(4, dtype=torch.bool)
    out = apply_penalties(logits, SamplingParams(logit_bias={1: 5.0, 3: -100}), none, torch.zeros(4))
    assert out.tolist() == [2.0, 3.0, 1.0, -99.5]


def test_token_logprob_and_top() -> None:
    logits = torch.tensor(LOGITS)
    lp = token_logprob(logits, 1, 2)
    assert lp.logprob == pytest.approx(math.log(0.2), abs=1e-6)
    assert [i for i, _ in lp.top] == [3, 2]
    assert lp.top[0][1] == pytest.approx(math.log(0.4), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("inf")}, "temperature=inf: must be a finite number"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": 21}, "logprobs"),
        ({"logit_bias": {5: 101}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"temprature": 0.5}, "unknown sampling parameter"),
    ],
)
def test_bad_parameters(kwargs, fragment) -> None:
    with pytest.raises(InvalidParameterError, match=fragment):
        SamplingParams.from_kwargs(**kwargs)


def test_same_seed_same_text(llm) -> None:
    kw = dict(max_tokens=24, temperature=1.0, top_k=64, top_p=0.95, seed=1234)
    a = llm.generate("Once upon a time", **kw)
    b = llm.generate("Once upon a time", **kw)
    c = llm.generate("Once upon a time", **{**kw, "seed": 99})
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_logprobs_are_the_models(llm) -> None:
    prompt = llm.tokenizer.encode("The capital of France is", add_bos=True)
    out = llm.generate(prompt, max_tokens=3, temperature=0, logprobs=5)
    logits = llm.logits(prompt + out.token_ids)
    for k, lp in enumerate(out.logprobs):
        ref = torch.log_softmax(logits[len(prompt) - 1 + k], dim=-1)
        assert lp.token_id == out.token_ids[k] == int(ref.argmax())
        # Same kernel, different batch shapes around the rounding of inputs to 16 bits: 1.3e-4 measured.
        assert lp.logprob == pytest.approx(float(ref[lp.token_id]), abs=1e-3)
        assert len(lp.top) == 5 and lp.top[0][0] == lp.token_id
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_prompt_logprobs_are_the_models(llm) -> None:
    prompt = llm.tokenizer.encode("The capital of France is", add_bos=True)
    out = llm.generate(prompt, max_tokens=1, temperature=0, prompt_logprobs=3)
    reference = torch.log_softmax(llm.logits(prompt), dim=-1)
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for k, lp in enumerate(out.prompt_logprobs[1:], start=1):
        assert lp.token_id == prompt[k]
        assert lp.logprob == pytest.approx(float(reference[k - 1, prompt[k]]), abs=1e-3)
        assert [i for i, _ in lp.top] == torch.topk(reference[k - 1], 3).indices.tolist()


def test_logit_bias_bans_and_forces_tokens(llm) -> None:
    prompt = llm.tokenizer.encode("The capital of France is", add_bos=True)
    logits = llm.logits(prompt)[-1]
    best, second = torch.topk(logits, 2).indices.tolist()
    banned = llm.generate(prompt, max_tokens=1, temperature=0, logit_bias={best: -100})
    assert banned.token_ids == [second]
    forced = llm.generate(prompt, max_tokens=5, temperature=0.8, seed=3, logit_bias={best: 100})
    assert forced.token_ids == [best] * 5
    with pytest.raises(InvalidParameterError, match="outside the vocabulary"):
        llm.generate(prompt, max_tokens=1, logit_bias={llm.config.vocab_size: 1.0})


def test_extreme_values_take_their_limits(llm) -> None:
    """Values at the edge of float range sample what their limit says instead of failing on inf/NaN."""
    prompt = llm.tokenizer.encode("The capital of France is", add_bos=True)
    greedy = llm.generate(prompt, max_tokens=6, temperature=0).token_ids
    assert llm.generate(prompt, max_tokens=6, temperature=1e-300, seed=1).token_ids == greedy
    assert llm.generate(prompt, max_tokens=6, top_p=1e-300, seed=1).token_ids == greedy
    # A vanishing repetition penalty makes the seen tokens (with positive logits) the only candidates.
    boosted = llm.generate(prompt, max_tokens=6, repetition_penalty=1e-300, seed=1).token_ids
    assert set(boosted) <= set(prompt)


def test_repetition_penalty_changes_greedy_output(llm) -> None:
    plain = llm.generate("1, 2, 3, 4,", max_tokens=16, temperature=0)
    penalized = llm.generate("1, 2, 3, 4,", max_tokens=16, temperature=0, repetition_penalty=1.5)
    assert plain.token_ids != penalized.token_ids


def test_argmax_is_torchs() -> None:
    """The C argmax behind greedy decoding picks what torch.argmax picks: the first of tied maxima, NaN first."""
    from gemmakit.sampling import argmax

    g = torch.Generator().manual_seed(0)
    for n in (1, 5, 16, 17, 31, 262144, 262145):
        for _ in range(10):
            x = torch.randn(n, generator=g)
            if n > 3:
                x[torch.randint(0, n, (2,), generator=g)] = x.max() + 1  # a tie for the top
            assert argmax(x) == int(torch.argmax(x))
    x = torch.randn(1000, generator=g)
    x[700], x[500] = float("nan"), float("nan")
    assert argmax(x) == int(torch.argmax(x)) == 500
    assert argmax(torch.full((100,), float("-inf"))) == int(torch.argmax(torch.full((100,), float("-inf")))) == 0
    strided = torch.randn(64, generator=g)[::2]  # not contiguous
    assert argmax(strided) == int(torch.argmax(strided))


@pytest.mark.parametrize("kw", [{"top_k": 5}, {"top_k": 5, "top_p": 0.7}, {"top_k": 8, "min_p": 0.2, "temperature": 0.5},
                                {"top_k": 3, "top_p": 0.95, "temperature": 2.0}])
def test_sampling_from_top_k_candidates_is_the_full_distribution(kw) -> None:
    """sample_token filters and draws among top-k's candidates: the same probabilities as the whole vector."""
    from gemmakit.sampling import top_k_candidates

    logits = torch.randn(500, generator=torch.Generator().manual_seed(0)) * 3
    low = torch.argsort(logits)[:2].tolist()
    logits[low] = torch.topk(logits, kw["top_k"]).values[-1]  # two ties with the k-th value: they stay in
    params = SamplingParams(**{**NEUTRAL, **kw})
    full = torch.softmax(filter_logits(logits, params), dim=-1)
    ids = top_k_candidates(logits, params.top_k)
    assert set(low) <= set(ids.tolist()) and len(ids) == kw["top_k"] + 2
    part = torch.zeros(500).index_copy(0, ids, torch.softmax(filter_logits(logits[ids], params, top_k_applied=True),
                                                               dim=-1))
    assert torch.allclose(part, full, atol=1e-7)


def test_nan_logits_fail_the_draw_with_top_k() -> None:
    from gemmakit.errors import GemmakitError
    from gemmakit.sampling import DrawSpec, TokenHistory, pick_tokens, sample_token

    logits = torch.zeros(300)
    logits[5] = float("nan")
    with pytest.raises(GemmakitError, match="not finite"):
        sample_token(logits, SamplingParams(top_k=10), torch.zeros(300, dtype=torch.bool), torch.zeros(300), 0.5)
    # The C sampler hands such a row to the reference, whose error comes back in the row's place.
    params = SamplingParams(top_k=10)
    (picked,) = pick_tokens(logits.unsqueeze(0), [DrawSpec(params, TokenHistory([], params), 1, 0)])
    assert isinstance(picked, GemmakitError) and "not finite" in str(picked)


def test_mask_logits_matches_the_bitmask() -> None:
    """The C pass that applies a grammar's token mask: -inf exactly where a bit is clear (llguidance's layout,
    least significant bit first), the rest untouched, the input left as it was."""
    from gemmakit.sampling import mask_logits

    g = torch.Generator().manual_seed(0)
    vocab = 1000  # not a multiple of 32: the last word is partial
    logits = torch.randn(vocab, generator=g)
    allowed = torch.rand(vocab, generator=g) < 0.3
    allowed[:64] = True  # whole words of ones (skipped) beside mixed ones
    padded = torch.zeros(32 * ((vocab + 31) // 32), dtype=torch.int64)
    padded[:vocab] = allowed.long()
    words = (padded.view(-1, 32) << torch.arange(32)).sum(1)
    bits = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    out = mask_logits(logits, bits)
    assert torch.equal(out, logits.masked_fill(~allowed, float("-inf")))
    assert torch.isfinite(logits).all()
