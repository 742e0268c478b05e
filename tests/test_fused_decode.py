"""The fused C decode step (kernels/fused.py) against the plain PyTorch path on the same models.

Both paths run the same decode steps on the same caches; only the kernels differ. Covered: the default
quantized Gemma 3 model, and every tiny family of test_families (Gemma 2's soft-cap, Gemma 4's KV sharing,
K = V, PLE, MoE) in a batch whose rows sit at different positions, one of them padding. Then the C loop over
all layers (csrc/layers.c) against the same fused pieces called from Python, bitwise.
"""

from __future__ import annotations

import pytest
import torch

from gemmakit.generate import decode_step, prefill
from gemmakit.kv_cache import KVCache
from gemmakit.kernels import fused
from test_families import FAMILIES, build


def on_and_off(switch: str, fn):
    """fn() with the switch ``fused.<switch>`` on, then off."""
    assert getattr(fused, switch)
    on = fn()
    setattr(fused, switch, False)
    try:
        off = fn()
    finally:
        setattr(fused, switch, True)
    return on, off


def run_both(fn):
    """fn() with the fused kernels, then with the PyTorch path."""
    return on_and_off("ENABLED", fn)


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


@pytest.mark.parametrize("G,D", [(1, 64), (2, 128), (4, 256), (8, 64), (3, 64), (4, 16)])
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 20.0)])
def test_decode_attention_matches_softmax(G, D, window, softcap) -> None:
    """The decode attention kernel (512-bit path for G in 1, 2, 4, 8 and D a multiple of 64, else the portable
    one) against softmax attention in float64: visible slots only (empty slots, slots past the query and outside
    the window hold NaN values, which must not leak in), a query at position 0, a padding row."""
    g = torch.Generator().manual_seed(G * 1000 + D)
    B, Hkv, S1 = 4, 2, 40
    H = G * Hkv
    k = torch.randn(B, S1, Hkv, D, generator=g)
    v = torch.randn(B, S1, Hkv, D, generator=g)
    slot_pos = torch.randperm(S1, generator=g).repeat(B, 1)  # slots hold positions in shuffled order
    slot_pos[:, ::7] = -1  # empty slots
    q = torch.randn(B, H, D, generator=g)
    q_pos = torch.tensor([[30], [12], [0], [-1]])
    scale = D**-0.5
    visible = (slot_pos >= 0) & (slot_pos <= q_pos)
    if window is not None:
        visible &= slot_pos > q_pos - window
    k[~visible], v[~visible] = float("nan"), float("nan")
    out = fused.attend(q, k, v, slot_pos, q_pos, window, scale, softcap).view(B, H, D)
    ref = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        seen = visible[b].nonzero()[:, 0]
        if q_pos[b, 0] < 0 or seen.numel() == 0:
            continue
        kk = k[b, seen].double().repeat_interleave(G, dim=1)  # (n, H, D)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), kk) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        ref[b] = torch.einsum("hn,nhd->hd", torch.softmax(scores, -1), v[b, seen].double().repeat_interleave(G, 1))
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_bf16_geglu_is_the_float_geglu_rounded() -> None:
    """The bf16 prompt path's GeGLU gives exactly float32 GeGLU of the widened input, rounded to bfloat16."""
    g = torch.Generator().manual_seed(7)
    gate_up = (torch.randn(37, 2 * 1027, generator=g) * 4).to(torch.bfloat16)  # 1027: the scalar tail too
    fast = fused.geglu(gate_up)
    assert fast.dtype == torch.bfloat16
    assert torch.equal(fast, fused.geglu(gate_up.float()).to(torch.bfloat16))


def run_loops(fn):
    """fn() with all layers of a decode step in one C call, then with the fused pieces called one by one."""
    return on_and_off("LAYER_LOOP", fn)


# What Gemma 1 and 2 lack of the tiny Gemma 3 layout (q/k norms; Gemma 1 also the post norms), and Gemma 2's caps.
TINY_ARCHS = {
    "gemma": (("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"), {}),
    "gemma2": (("attn_q_norm", "attn_k_norm"), {"gemma2.attn_logit_softcapping": 50.0,
                                                "gemma2.final_logit_softcapping": 30.0}),
    "gemma3": ((), {}),
}


def tiny_quantized_model(tmp_path, arch: str = "gemma3"):
    """The tiny GGUF of helpers.py with Q8_0 matrices: quantized weights (the C layer loop's case) and a sliding
    window of 8 (Gemma 2 and 3), so decode steps wrap the rings."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    import gemmakit
    from helpers import TINY, tiny_tensors, tiny_vocab, write_tiny_gguf

    missing, metadata = TINY_ARCHS[arch]
    floats = tiny_tensors(TINY, len(tiny_vocab()[0]), np.random.default_rng(5))
    mats = {name: a for name, a in floats.items() if a.ndim == 2}
    q8 = GGMLQuantizationType.Q8_0
    drop = tuple(f"blk.{i}.{name}.weight" for i in range(TINY["layers"]) for name in missing)
    path = write_tiny_gguf(tmp_path / "q8.gguf", arch=arch, drop=drop, metadata=metadata,
                           extra={n: quants.quantize(a, q8) for n, a in mats.items()}, raw_types={n: q8 for n in mats})
    return gemmakit.load(path)


@torch.inference_mode()
def test_layer_loop_is_the_python_loop_bitwise(llm) -> None:
    """One C call for all layers gives exactly the logits of the per-piece loop: one sequence, and ragged steps of
    several sequences (decode tokens and prompt pieces together, each in its own cache row)."""
    from test_ragged import ragged_logits

    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6, add_bos=True)
    assert llm.model.decode_path == fused.LAYER_LOOP_PATH

    def decode_all() -> torch.Tensor:
        cache = KVCache(llm.config, 1, 256)
        prefill(llm.model, ids[:8], cache)
        assert fused._layer_table(llm.model, cache) is not None  # the C loop covers this model
        return torch.stack([decode_step(llm.model, ids[t], t, cache) for t in range(8, len(ids))])

    one_call, pieces = run_loops(decode_all)
    assert torch.equal(one_call, pieces)
    sequences = {0: ids[:20], 2: ids[3:30], 1: ids[10:19]}
    plans = {0: [1] * 20, 2: [1, 1, 1] + [1] * 24, 1: [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]}

    def ragged() -> dict:
        return ragged_logits(llm.model, llm.config, plans, sequences, ring_extra=0)

    a, b = run_loops(ragged)
    assert all(torch.equal(a[row], b[row]) for row in sequences)


def padded_decode(llm, ids: list[int], steps: int = 20) -> torch.Tensor:
    """Logits of the two real rows of a padded batch (prompts of 13 and 6 tokens, a row of padding all along)
    decoded ``steps`` tokens past the prompt, one token per row per step; the C layer loop must cover the model."""
    model, lengths = llm.model, [13, 6, 0]
    cache = KVCache(llm.config, len(lengths), 64)
    T = max(lengths)
    positions = torch.tensor([[t if t < n else -1 for t in range(T)] for n in lengths])
    model(torch.tensor([ids[:T]] * len(lengths)), positions, cache)
    assert fused._layer_table(model, cache) is not None
    out = []
    for step in range(steps):  # past the window of 8: rings wrap (and shared layers read wrapped rings)
        pos = torch.tensor([[n + step] if n else [-1] for n in lengths])
        tok = torch.tensor([[ids[(n + step) % len(ids)]] for n in lengths])
        out.append(model.logits(model(tok, pos, cache))[:2, 0])
    return torch.stack(out)


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
@torch.inference_mode()
def test_layer_loop_wraps_rings_and_skips_padding(arch, tmp_path) -> None:
    """Quantized Gemma 1, 2 (soft-capped attention) and 3 with a window of 8: a padded batch decoded past the
    window, one C call per step, gives exactly the per-piece loop's logits."""
    llm = tiny_quantized_model(tmp_path, arch)
    assert (llm.config.attn_logit_softcapping is not None) == (arch == "gemma2")
    one_call, pieces = run_loops(lambda: padded_decode(llm, list(range(10, 60))))
    assert torch.isfinite(one_call).all() and torch.equal(one_call, pieces)


def tiny_quantized_gemma4(tmp_path, kind: str, qtypes: dict | None = None):
    """A tiny random Gemma 4 as a llama.cpp GGUF with Q8_0 matrices (``qtypes``: other types for some, see
    write_gemma4_gguf): E2B-like (per-layer inputs of width 32, KV sharing, double-wide MLP on the shared layers),
    31B-like (K = V global layers) or 26B-A4B-like (experts)."""
    import gemmakit
    from test_families import build, gemma4, write_gemma4_gguf

    config = gemma4(kind)
    if kind == "e2b":
        config.hidden_size_per_layer_input = 32  # whole Q8_0 blocks, so the PLE matrices are quantized too
    if kind == "26b":
        config.moe_intermediate_size = 32  # and both expert stacks
    _, ref, llm, ids = build(f"gemma4_{kind}", tmp_path / "hf", factory=lambda: config)
    path = tmp_path / f"{kind}-q8.gguf"
    write_gemma4_gguf(ref, llm.config.layers, path, qtype="Q8_0", qtypes=qtypes)
    return gemmakit.load(path), ids


@pytest.mark.parametrize("kind,qtypes", [("e2b", None), ("31b", None), ("e2b", {"attn_v.weight": "Q4_1"})],
                         ids=["e2b", "31b", "e2b-unfused-qkv"])
@torch.inference_mode()
def test_gemma4_layer_loop_is_the_python_loop_bitwise(kind, qtypes, tmp_path) -> None:
    """Gemma 4 on the one-call C loop (per-layer inputs, KV-shared layers reading their owner's cache, K = V,
    value norms, layer scalars, proportional RoPE on global layers; q, k and v apart when their formats cannot
    be stacked, as llama.cpp's Q4_K_M files mix Q4_K and Q6_K): a padded batch decoded past the window gives
    exactly the per-piece loop's logits, and those stay within rounding of the plain PyTorch path."""
    llm, ids = tiny_quantized_gemma4(tmp_path, kind, qtypes)
    assert (llm.model.layers[0].self_attn.qkv_proj is None) == bool(qtypes)

    def decode_rows() -> torch.Tensor:
        return padded_decode(llm, ids)

    one_call, pieces = run_loops(decode_rows)
    assert torch.isfinite(one_call).all() and torch.equal(one_call, pieces)
    fused_path, plain = run_both(decode_rows)
    assert (fused_path - plain).abs().max().item() <= 2e-2
    assert torch.equal(fused_path.argmax(-1), plain.argmax(-1))


@pytest.mark.parametrize("kind,bits", [("e2b", 16), ("31b", 16), ("26b", 16), ("e2b", 8), ("26b", 8)])
@torch.inference_mode()
def test_gemma4_layer_loop_batched_is_alone(kind, bits, tmp_path) -> None:
    """A sequence through the C loop (the per-piece loop for the experts) gives the same logits, bit for bit,
    alone or in ragged steps with others; with 8-bit decode x too."""
    from gemmakit.quant.linear import set_decode_x_bits
    from test_ragged import ragged_logits

    llm, ids = tiny_quantized_gemma4(tmp_path, kind)
    set_decode_x_bits(llm.model, bits)
    alone = ragged_logits(llm.model, llm.config, {0: [1] * 20}, {0: ids[:20]}, ring_extra=0)
    sequences = {0: ids[:20], 2: ids[3:30], 1: ids[10:19]}
    plans = {0: [1] * 20, 2: [3] + [1] * 24, 1: [0, 0, 2] + [1] * 7}
    together = ragged_logits(llm.model, llm.config, plans, sequences, ring_extra=0)
    assert torch.equal(alone[0], together[0])


@torch.inference_mode()
def test_gemma4_experts_stay_on_the_python_loop(tmp_path) -> None:
    """The mixture-of-experts block has no C loop yet: such a model decodes through the per-piece loop."""
    llm, ids = tiny_quantized_gemma4(tmp_path, "26b")
    assert llm.model.decode_path == ("C pieces, layer by layer (layer 0: its mixture-of-experts block has no C loop "
                                     "yet)")  # decided at load, shown by `gemmakit bench`
    cache = KVCache(llm.config, 1, 64)
    prefill(llm.model, ids[:8], cache)
    assert fused._layer_table(llm.model, cache) is None


@torch.inference_mode()
def test_gemma4_quantized_experts(tmp_path) -> None:
    """26B-A4B-like with Q8_0 expert stacks: they stay packed, one matrix per expert (a token reads only its
    experts' rows), and decoding stays within rounding of the dequantized float model (its argmax the same)."""
    from gemmakit.quant.linear import QuantExperts

    llm, ids = tiny_quantized_gemma4(tmp_path, "26b")
    experts = llm.model.layers[0].experts
    assert isinstance(experts, QuantExperts) and len(experts.gate_up) == llm.config.num_experts
    assert experts.gate_up[0].shape == (2 * llm.config.moe_intermediate_size, llm.config.hidden_size)
    import gemmakit

    plain = gemmakit.load(tmp_path / "26b-q8.gguf", quant="fp32")
    assert type(plain.model.layers[0].experts).__name__ == "Experts"
    fast, slow = llm.logits(ids), plain.logits(ids)
    assert (fast - slow).abs().max().item() <= 2e-2 * slow.abs().max().item()
    cache_a, cache_b = KVCache(llm.config, 1, 64), KVCache(llm.config, 1, 64)
    prefill(llm.model, ids[:20], cache_a)
    prefill(plain.model, ids[:20], cache_b)
    for pos in range(20, 30):  # decode steps: one token per row through the integer kernels
        a = llm.model.logits(llm.model(torch.tensor([[ids[pos]]]), torch.tensor([[pos]]), cache_a)[0, -1])
        b = plain.model.logits(plain.model(torch.tensor([[ids[pos]]]), torch.tensor([[pos]]), cache_b)[0, -1])
        assert (a - b).abs().max().item() <= 2e-2 * b.abs().max().item() and a.argmax() == b.argmax()
