"""The fused C decode step (quant/fused.py) against the plain PyTorch path on the same models.

Both paths run the same decode steps on the same caches; only the kernels differ. Covered: the default
quantized Gemma 3 model, and every tiny family of test_families (Gemma 2's soft-cap, Gemma 4's KV sharing,
K = V, PLE, MoE) in a batch whose rows sit at different positions, one of them padding.
"""

from __future__ import annotations

import pytest
import torch

from gemmakit.generate import decode_step, prefill
from gemmakit.kv_cache import KVCache
from gemmakit.quant import fused
from test_families import FAMILIES, build


def run_both(fn):
    """fn() with the fused kernels, then with the PyTorch path."""
    assert fused.ENABLED
    with_fused = fn()
    fused.ENABLED = False
    try:
        plain = fn()
    finally:
        fused.ENABLED = True
    return with_fused, plain


@torch.inference_mode()
def test_default_model_decode_matches_pytorch_path(llm) -> None:
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 12, add_bos=True)

    def decode_all() -> torch.Tensor:
        cache = KVCache(llm.config, 1, 256)
        prefill(llm.model, ids[:8], cache)
        return torch.stack([decode_step(llm.model, ids[t], t, cache) for t in range(8, len(ids))])

    a, b = run_both(decode_all)
    diff = (a - b).abs().max().item()
    print(f"fused vs PyTorch decode, {len(ids) - 8} steps: max |logits diff| = {diff:.2e}")
    # Both paths' matmuls round their inputs to 16 bits per group (csrc/qgemv.c); float differences of ~1e-7
    # between the two attention paths flip a few of those roundings, which then carry through the cache.
    # Measured 6.7e-3 over 114 steps (|logits| up to ~50); a wrong mask or position is off by whole units.
    assert diff <= 2e-2
    assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("name", list(FAMILIES))
@torch.inference_mode()
def test_batched_decode_matches_pytorch_path(name, tmp_path) -> None:
    _, _, llm, ids = build(name, tmp_path)
    model = llm.model
    lengths = [30, 17, 0]  # the last row is padding all along

    def decode_rows() -> torch.Tensor:
        cache = KVCache(llm.config, len(lengths), 64)
        T = max(lengths)
        tokens = torch.tensor([ids[:T]] * len(lengths))
        positions = torch.tensor([[t if t < n else -1 for t in range(T)] for n in lengths])
        model(tokens, positions, cache)
        out = []
        for step in range(10):  # past the window of 8, so ring buffers wrap and shared layers read them
            pos = torch.tensor([[n + step] if n else [-1] for n in lengths])
            tok = torch.tensor([[ids[(n + step) % len(ids)]] for n in lengths])
            out.append(model.logits(model(tok, pos, cache))[:2, 0])  # the two real rows
        return torch.stack(out)

    a, b = run_both(decode_rows)
    diff = (a - b).abs().max().item()
    assert torch.isfinite(a).all() and diff <= 1e-4, diff


def test_bf16_geglu_is_the_float_geglu_rounded() -> None:
    """The bf16 prompt path's GeGLU gives exactly float32 GeGLU of the widened input, rounded to bfloat16."""
    g = torch.Generator().manual_seed(7)
    gate_up = (torch.randn(37, 2 * 1027, generator=g) * 4).to(torch.bfloat16)  # 1027: the scalar tail too
    fast = fused.geglu(gate_up)
    assert fast.dtype == torch.bfloat16
    assert torch.equal(fast, fused.geglu(gate_up.float()).to(torch.bfloat16))
