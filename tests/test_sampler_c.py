"""The C sampler (kernels/csrc/sample.c) against the reference computation (sampling.filter_logits and
apply_penalties in PyTorch): token frequencies over many draws pass a chi-square test against the reference
probabilities for each knob and their combinations, tokens the reference gives probability 0 never come, and a
seed gives the same tokens alone or batched."""

from __future__ import annotations

import math

import pytest
import torch

from gemmakit.kernels import kernels
from gemmakit.sampling import (DrawSpec, SamplingParams, TokenHistory, apply_penalties, filter_logits, pick_tokens,
                               reference_token, uniform)

pytestmark = pytest.mark.skipif(kernels() is None, reason="needs the compiled kernels (a C compiler)")

VOCAB = 1000  # not a multiple of 16 or 32: the vector passes and their scalar tails both run
DRAWS = 20000
NEUTRAL = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}


def _chi2_critical(df: int, z: float = 4.265) -> float:
    """Upper quantile of chi-square with df degrees of freedom at p = 1e-5 (Wilson-Hilferty): a correct sampler
    fails one of these tests once in 100,000 runs."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _reference_probs(logits: torch.Tensor, params: SamplingParams, history: TokenHistory,
                     allowed: torch.Tensor | None = None) -> torch.Tensor:
    seen, counts = history.dense(logits.shape[-1])
    x = apply_penalties(logits, params, seen, counts)
    if allowed is not None:
        x = x.masked_fill(~allowed, float("-inf"))
    return torch.softmax(filter_logits(x, params), dim=-1).double()


def _draw_many(logits: torch.Tensor, spec: DrawSpec, n: int = DRAWS) -> torch.Tensor:
    """Counts of each token over n draws (counters 0 .. n - 1), picked in batches of rows by one C call each."""
    counts = torch.zeros(logits.shape[-1], dtype=torch.float64)
    for start in range(0, n, 2000):
        rows = min(2000, n - start)
        specs = [DrawSpec(spec.params, spec.history, spec.seed, start + i, spec.bitmask, spec.banned)
                 for i in range(rows)]
        picks = pick_tokens(logits.expand(rows, -1).contiguous(), specs)
        assert all(isinstance(p, int) for p in picks)
        counts += torch.bincount(torch.tensor(picks), minlength=logits.shape[-1]).double()
    return counts


def _assert_matches(counts: torch.Tensor, probs: torch.Tensor) -> None:
    n = counts.sum()
    assert counts[probs == 0].sum() == 0, "a token the reference gives probability 0 was drawn"
    expected = probs * n
    # Tokens expected fewer than 5 times are pooled into one bin, as the chi-square approximation needs.
    big = expected >= 5
    observed_bins = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)])
    expected_bins = torch.cat([expected[big], expected[~big].sum().unsqueeze(0)])
    keep = expected_bins > 0
    observed_bins, expected_bins = observed_bins[keep], expected_bins[keep]
    df = int(keep.sum()) - 1
    assert df >= 1
    chi2 = float(((observed_bins - expected_bins) ** 2 / expected_bins).sum())
    assert chi2 < _chi2_critical(df), f"chi-square {chi2:.1f} over {df} degrees of freedom"


def _logits(scale: float, seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * scale


KNOBS = [
    {"temperature": 0.7},
    {"temperature": 1.5, "top_k": 5},
    {"temperature": 1.0, "top_p": 0.8},
    {"temperature": 1.0, "min_p": 0.1},
    {"temperature": 1.3, "top_k": 20, "top_p": 0.9, "min_p": 0.05},
    {"temperature": 0.9, "top_p": 0.95, "min_p": 0.02},
]


@pytest.mark.parametrize("scale", [3.0, 0.3])  # a peaked and a nearly flat distribution (top-p's wide nucleus)
@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_distribution_matches_the_reference(knobs, scale) -> None:
    params = SamplingParams(**{**NEUTRAL, **knobs})
    logits = _logits(scale)
    history = TokenHistory([], params)
    _assert_matches(_draw_many(logits, DrawSpec(params, history, seed=7, counter=0)),
                    _reference_probs(logits, params, history))


def test_top_k_keeps_ties_with_the_kth_value() -> None:
    params = SamplingParams(**{**NEUTRAL, "top_k": 4})
    logits = _logits(2.0, seed=1)
    kth = torch.topk(logits, 4).values[-1]
    logits[torch.argsort(logits)[:3]] = kth  # three more tokens tie with the 4th largest: 7 candidates
    history = TokenHistory([], params)
    probs = _reference_probs(logits, params, history)
    assert int((probs > 0).sum()) == 7
    _assert_matches(_draw_many(logits, DrawSpec(params, history, 3, 0)), probs)


def test_penalties_and_bias_match_the_reference() -> None:
    params = SamplingParams(**{**NEUTRAL, "temperature": 0.8, "top_k": 30, "repetition_penalty": 1.5,
                               "presence_penalty": 0.5, "frequency_penalty": 0.3,
                               "logit_bias": {11: 4.0, 12: -100.0, 500: 2.5}})
    logits = _logits(2.0, seed=2)
    top = torch.topk(logits, 10).indices.tolist()
    history = TokenHistory(top[:5] + [3, 3, 900], params)  # the prompt: repetition penalty only
    for token in top[3:8] + top[3:5] + [11]:  # generated: all three penalties (some tokens twice)
        history.add(token)
    probs = _reference_probs(logits, params, history)
    before = logits.clone()
    _assert_matches(_draw_many(logits, DrawSpec(params, history, 5, 0)), probs)
    assert torch.equal(logits, before)  # the in-place edits were put back


def test_grammar_mask_and_bans_match_the_reference() -> None:
    params = SamplingParams(**{**NEUTRAL, "temperature": 1.0, "top_k": 50, "top_p": 0.9})
    logits = _logits(2.0, seed=3)
    allowed = torch.rand(VOCAB, generator=torch.Generator().manual_seed(4)) < 0.3
    banned = torch.nonzero(allowed)[:5, 0].tolist()  # five allowed tokens banned as well (e.g. thought markers)
    words = (VOCAB + 31) // 32
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[:VOCAB] = allowed.long()
    bitmask = (bits.view(words, 32) << torch.arange(32)).sum(-1)
    bitmask = torch.where(bitmask >= 2**31, bitmask - 2**32, bitmask).to(torch.int32)  # llguidance's int32 words
    history = TokenHistory([], params)
    still = allowed.clone()
    still[banned] = False
    probs = _reference_probs(logits, params, history, still)
    _assert_matches(_draw_many(logits, DrawSpec(params, history, 9, 0, bitmask, banned)), probs)


def test_greedy_is_the_argmax_after_penalties_and_mask() -> None:
    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        logits = torch.randn(VOCAB, generator=g)
        params = SamplingParams(temperature=0, repetition_penalty=1.0 + trial / 10, logit_bias={trial: 1.5})
        history = TokenHistory(torch.topk(logits, 3).indices.tolist(), params)
        spec = DrawSpec(params, history, 0, 0, banned=[int(torch.argmax(logits))])
        assert pick_tokens(logits.unsqueeze(0), [spec]) == [reference_token(logits, spec)]


def test_the_draws_number_is_the_same_in_c_and_python() -> None:
    lib = kernels()
    for seed, counter in [(0, 0), (1, 2), (2**64 - 1, 10**12), (12345, 7)]:
        bits = lib.sample_uniform_bits(seed, counter)
        assert (bits >> 11) * 2.0**-53 == uniform(seed, counter)


def test_same_seed_same_tokens_alone_and_batched(tmp_path) -> None:
    """Sampled sequences through the engine: each gives the tokens it gives alone, with others in its steps."""
    import gemmakit
    from gemmakit.engine import Engine
    from helpers import write_tiny_gguf

    llm = gemmakit.load(write_tiny_gguf(tmp_path / "tiny.gguf"))
    prompts = [list(range(10 + 5 * k, 20 + 5 * k)) for k in range(3)]
    params = [SamplingParams.from_kwargs(max_tokens=12, temperature=t, top_k=k, top_p=p, seed=s, ignore_eos=True,
                                         repetition_penalty=r)
              for t, k, p, s, r in [(1.0, 0, 1.0, 1, 1.0), (0.8, 40, 0.9, 2, 1.2), (1.2, 0, 0.7, 3, 1.0)]]
    engine = Engine(llm.model, llm.tokenizer, [], 64, max_batch=3)
    try:
        alone = [[ev.token_id for ev in engine.submit(p, sp)] for p, sp in zip(prompts, params)]
        streams = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
        together = [[ev.token_id for ev in s] for s in streams]
        assert engine.peak_batch >= 2
    finally:
        engine.shutdown()
    assert together == alone and all(len(t) == 12 for t in alone)
    direct = [llm.generate(p, max_tokens=12, temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                           seed=sp.seed, ignore_eos=True, repetition_penalty=sp.repetition_penalty).token_ids
              for p, sp in zip(prompts, params)]
    assert direct == alone  # the single-sequence loop draws the same numbers
