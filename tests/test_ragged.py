"""The ragged forward (Gemma.forward with ``rows``) that the continuous-batching engine runs.

One forward carries several sequences' tokens at once: prompt pieces and decode tokens, one token per batch row,
each in its sequence's cache row. Checked here:
- against the plain full forward on every tiny family, with the fused kernels and with the PyTorch path, over
  prompts longer than the sliding window cut into pieces (so the rings wrap between and inside steps);
- on the default quantized model: a sequence's logits are bitwise the same alone or next to other sequences,
  and whatever the pieces its prompt was cut into; and they track the float forward;
- the engine past 16 sequences at once (more rows than one decode batch used to take).
"""

from __future__ import annotations

import pytest
import torch

from gemmakit.engine import Engine
from gemmakit.kv_cache import KVCache
from gemmakit.sampling import SamplingParams
from test_families import FAMILIES, build
from test_fused_decode import run_both


def ragged_logits(model, config, plans: dict[int, list[list[int]]], sequences: dict[int, list[int]],
                  ring_extra: int, n_rows: int = 4, max_len: int = 64) -> dict[int, torch.Tensor]:
    """Run sequences through ragged forwards and return each one's logits at every position.

    ``plans[row]`` lists, step by step, how many of that row's tokens go into each forward (0: sits out).
    """
    cache = KVCache(config, n_rows, max_len, ring_extra=ring_extra)
    done = {row: 0 for row in sequences}
    out: dict[int, list[torch.Tensor]] = {row: [] for row in sequences}
    steps = max(len(p) for p in plans.values())
    for step in range(steps):
        tokens, rows, positions = [], [], []
        for row, ids in sequences.items():
            n = plans[row][step] if step < len(plans[row]) else 0
            tokens += ids[done[row] : done[row] + n]
            positions += range(done[row], done[row] + n)
            rows += [row] * n
            done[row] += n
        if not tokens:
            continue
        hidden = model(torch.tensor(tokens).unsqueeze(1), torch.tensor(positions).unsqueeze(1), cache,
                       rows=torch.tensor(rows))
        logits = model.logits(hidden)[:, 0]
        for i, row in enumerate(rows):
            out[row].append(logits[i])
    return {row: torch.stack(v) for row, v in out.items()}


@pytest.mark.parametrize("name", list(FAMILIES))
@torch.inference_mode()
def test_ragged_forward_matches_full_forward(name, tmp_path) -> None:
    _, _, llm, ids = build(name, tmp_path)
    a, b, c = ids[:30], ids[5:22], ids[10:40]  # 30, 17 and 30 tokens; the window is 8
    chunk = 6
    sequences = {2: a, 0: b, 3: c}
    plans = {
        2: [6, 6, 6, 6, 6],  # whole chunks
        0: [0, 5, 1, 1, 6, 4],  # joins late, then mixes one-token steps with pieces
        3: [3, 6, 1, 6, 6, 6, 2],
    }
    assert all(sum(p) == len(sequences[r]) for r, p in plans.items())
    assert all(max(p) <= chunk for p in plans.values())

    def run() -> dict[int, torch.Tensor]:
        return ragged_logits(llm.model, llm.config, plans, sequences, ring_extra=chunk)

    fused_out, plain_out = run_both(run)
    for row, seq in sequences.items():
        full = llm.logits(seq)  # the plain forward of the whole sequence, no cache
        for got in (fused_out[row], plain_out[row]):
            diff = (got - full).abs().max().item()
            assert torch.isfinite(got).all() and diff <= 1e-4, (name, row, diff)


@torch.inference_mode()
def test_ragged_rows_do_not_depend_on_the_batch(llm) -> None:
    """Bitwise: the default (quantized) model gives a sequence the same logits alone, next to other sequences
    in other rows, and with its prompt cut differently."""
    ids = llm.tokenizer.encode("A short note about the weather in the mountains, written in the morning.",
                               add_bos=True)
    other = llm.tokenizer.encode("def add(a, b):\n    return a + b\n\nprint(add(2, 3))", add_bos=True)
    n = len(ids)
    alone = ragged_logits(llm.model, llm.config, {0: [n, 1, 1, 1]}, {0: ids + [107, 108, 109]}, ring_extra=128,
                          max_len=256)[0]
    cut = ragged_logits(llm.model, llm.config, {0: [5, n - 5, 1, 1, 1]}, {0: ids + [107, 108, 109]},
                        ring_extra=128, max_len=256)[0]
    mixed = ragged_logits(
        llm.model, llm.config,
        {3: [0, 2, n - 2, 1, 1, 1], 1: [len(other) - 4, 4, 1, 1, 1, 1]},
        {3: ids + [107, 108, 109], 1: other + [50, 51, 52, 53]}, ring_extra=128, max_len=256)[3]
    assert torch.equal(alone, cut)
    assert torch.equal(alone, mixed)


@torch.inference_mode()
def test_ragged_logits_track_the_float_forward(precise_llm) -> None:
    """The ragged path rounds matmul inputs to 16 bits per group (the decode kernel); against the float32
    forward of the same quantized weights it stays within the bound of cached decoding (test_model_parity)."""
    llm = precise_llm
    ids = llm.tokenizer.encode("The history of the printing press begins in the fifteenth century, when", add_bos=True)
    got = ragged_logits(llm.model, llm.config, {1: [7, len(ids) - 7]}, {1: ids}, ring_extra=128, max_len=128)[1]
    full = llm.logits(ids)
    diff = (got - full).abs().max().item()
    print(f"ragged vs float forward over {len(ids)} tokens: max |logits diff| = {diff:.2e}")
    assert diff <= 3e-2
    assert torch.equal(got.argmax(-1), full.argmax(-1))


@torch.inference_mode()
def test_engine_runs_more_than_16_sequences_at_once(llm) -> None:
    prompts = [llm.prompt_ids(f"Item {i}: the number {i * 7} is") for i in range(18)]
    params = SamplingParams.from_kwargs(max_tokens=6, temperature=0, ignore_eos=True)

    def tokens(stream) -> list[int]:
        return [ev.token_id for ev in stream]

    engine = Engine(llm.model, llm.tokenizer, llm.stop_token_ids, 256, max_batch=18)
    try:
        alone = [tokens(engine.submit(p, params)) for p in prompts]
        streams = [engine.submit(p, params) for p in prompts]
        together = [tokens(s) for s in streams]
        assert engine.peak_batch == 18
    finally:
        engine.shutdown()
    assert together == alone
    assert all(len(t) == 6 for t in alone)


def test_engine_refuses_bad_sizes(llm) -> None:
    from gemmakit.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="max_batch=65"):
        Engine(llm.model, llm.tokenizer, llm.stop_token_ids, 256, max_batch=65)
    with pytest.raises(InvalidParameterError, match="prefill_chunk=300"):
        Engine(llm.model, llm.tokenizer, llm.stop_token_ids, 256, prefill_chunk=300, prefill_budget=256)


@torch.inference_mode()
def test_a_failing_sequence_ends_alone(tmp_path) -> None:
    """A sequence whose sampling fails (NaN logits, from a corrupt embedding row here) gets its error; the
    sequences stepped in the same forwards finish with the tokens they get alone."""
    import gemmakit
    from gemmakit.errors import GemmakitError
    from helpers import write_tiny_gguf

    llm = gemmakit.load(write_tiny_gguf(tmp_path / "tiny.gguf"))
    poisoned = 270
    llm.model.embed_tokens.weight[poisoned] = float("nan")
    good = [list(range(10 + 7 * k, 22 + 7 * k)) for k in range(2)]
    greedy = SamplingParams.from_kwargs(max_tokens=8, temperature=0, ignore_eos=True)
    sampled = SamplingParams.from_kwargs(max_tokens=8, temperature=1.0, seed=0, ignore_eos=True)
    engine = Engine(llm.model, llm.tokenizer, [], 64, max_batch=3)
    try:
        alone = [[ev.token_id for ev in engine.submit(p, greedy)] for p in good]
        bad = engine.submit([2, poisoned] + good[0], sampled)
        streams = [engine.submit(p, greedy) for p in good]
        with pytest.raises(GemmakitError, match="not finite"):
            list(bad)
        together = [[ev.token_id for ev in s] for s in streams]
        assert engine.peak_batch >= 2
    finally:
        engine.shutdown()
    assert together == alone and all(len(t) == 8 for t in alone)
