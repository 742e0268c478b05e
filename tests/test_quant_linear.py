"""Quantized weights in memory: the C kernel, the PyTorch fallback and the dequantized fp32 path agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants

import gemmakit
from gemmakit.errors import ModelTooLargeError
from gemmakit.kernels import loader as kernels_module
from gemmakit.quant.ggml import QUANTIZED_TYPES, split, split_packed
from gemmakit.errors import InvalidParameterError
from gemmakit.quant.linear import (QuantWeight, cpu_flags, decode_x8_native, expand_two_level, pack,
                                   set_decode_x_bits, set_prefill_dtype)
from test_quant_ggml import random_blocks


def test_kernel_is_built_here() -> None:
    # CI and developer machines have a C compiler: the fast path must be active, not silently skipped.
    assert kernels_module.kernels() is not None


@pytest.mark.parametrize("qtype", sorted(QUANTIZED_TYPES, key=int), ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_matmul_matches_dequantized(qtype: T, rows: int, monkeypatch) -> None:
    rng = np.random.default_rng(int(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    N, K = 96, 2 * max(block_size, 256)
    raw = random_blocks(qtype, N * K // block_size, rng).reshape(N, K // block_size * type_size)
    raw_t = torch.from_numpy(raw)
    weight = QuantWeight.from_packed(*split_packed(raw_t, qtype, (N, K)), N, K)
    dense = torch.from_numpy(quants.dequantize(raw, qtype))
    assert torch.equal(weight.dequantize(), dense)  # the C dequantizer is exact too
    assert torch.equal(weight.dequantize(torch.tensor([5, 0, 95])), dense[[5, 0, 95]])
    x = torch.randn(rows, K, generator=torch.Generator().manual_seed(0))
    ref = x.double() @ dense.double().t()
    fast = weight.matmul(x)
    # The kernel rounds x to 16 bits per group of `group` values: each x is off by at most half a step,
    # max|x in its group| / 32767 / 2. Bound the product by that, plus float32 rounding.
    step = x.view(rows, -1, weight.group).abs().amax(-1, keepdim=True).expand(-1, -1, weight.group).reshape(rows, K)
    bound = (step.double() / 32767 / 2) @ dense.double().abs().t()
    excess = (fast.double() - ref).abs() - bound
    assert excess.max().item() <= 1e-5 * float(ref.abs().max()) + 1e-5
    tol = 1e-5 * float(ref.abs().max()) + 1e-5
    monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "1")
    kernels_module.kernels.cache_clear()
    try:
        slow = weight.matmul(x)
        assert torch.equal(weight.dequantize(), dense)
    finally:
        monkeypatch.delenv("GEMMAKIT_NO_KERNELS")
        kernels_module.kernels.cache_clear()
    assert (slow.double() - ref).abs().max().item() <= tol


def test_quantized_model_tracks_fp32(model_path, llm, precise_llm) -> None:
    """quant='int8'/'auto' keep the GGUF's int8/4/5/6-bit values: prompt logits (float32 matmuls) differ from
    fp32 only by summation order, decode logits also by the kernel's 16-bit rounding of its inputs."""
    fp32 = gemmakit.load(model_path, quant="fp32")
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6, add_bos=True)
    full = fp32.logits(ids)
    # Long inputs dequantize per layer (prefill path): the fp32 matmuls, but the quantized model's fused gate|up
    # runs GeGLU in C where the fp32 model's separate projections use PyTorch's GELU.
    prefill_diff = (precise_llm.logits(ids) - full).abs().max().item()
    print(f"max |dequantized prefill logits - fp32| = {prefill_diff:.2e}")
    assert prefill_diff <= 2e-4
    default_llm, llm = llm, precise_llm
    # One token at a time goes through the int8 kernel.
    from gemmakit.generate import decode_step, prefill
    from gemmakit.kv_cache import KVCache

    cache = KVCache(llm.config, 1, len(ids))
    prefill(llm.model, ids[:20], cache)
    worst = max(
        (decode_step(llm.model, ids[t], t, cache) - full[t]).abs().max().item() for t in range(20, len(ids))
    )
    print(f"max |int8-kernel decode logits - fp32| = {worst:.2e}")
    assert worst <= 5e-3
    for prompt in ("Explain quantum computing in simple terms:", "The three primary colors are"):
        b = fp32.generate(prompt, max_tokens=32, temperature=0).token_ids
        assert precise_llm.generate(prompt, max_tokens=32, temperature=0).token_ids == b
        assert default_llm.generate(prompt, max_tokens=32, temperature=0).token_ids == b  # bf16 prompts here
    # The embedding/head and every projection stay quantized: no float matrix is left.
    assert not [n for n, m in llm.model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    assert sum(1 for m in llm.model.modules() if hasattr(m, "qweight")) >= 1 + 18 * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8], ids=["bf16", "int8"])
def test_fast_prefill_tracks_fp32_prefill(model_path, dtype: torch.dtype) -> None:
    """The defaults for prompt products: bfloat16 on CPUs with native bf16, else 8-bit activations for 4-bit
    matrices (the default model's attention outputs, Q4_K). Stated bounds, measured on 840 tokens of prose:
    bf16 max |logits diff| 0.57 (|logits| up to 52), top-1 agreement 98.6%, mean NLL +0.03%; int8 0.80, 98.4%,
    +0.15%."""
    from test_model_parity import TEXT  # a paragraph of ordinary prose (~300 tokens)

    model = gemmakit.load(model_path, quant="int8")
    assert {m.prefill_dtype for m in model.model.modules() if isinstance(m, QuantWeight)} == {torch.float32}
    ids = model.tokenizer.encode(TEXT, add_bos=True)
    exact = model.logits(ids)
    set_prefill_dtype(model.model, dtype)
    fast = model.logits(ids)

    diff, agree, nll_fast, nll_exact = _logits_against(fast, exact, ids[1:], f"{dtype} vs fp32 prefill")
    if dtype == torch.int8 and "avx512bw" not in cpu_flags():
        assert diff == 0  # no 8-bit kernel on this CPU: the float32 product, unchanged
    else:
        assert 0 < diff <= 1.5
    assert agree >= 0.95
    # The accuracy bar for speed work: mean NLL within 0.5%.
    assert abs(nll_fast - nll_exact) <= 0.005 * nll_exact


def _logits_against(fast: torch.Tensor, exact: torch.Tensor, targets: list[int],
                    what: str) -> tuple[float, float, float, float]:
    """(max |fast - exact|, top-1 agreement, mean NLL of fast, of exact) for (T, V) logits whose rows predict
    ``targets`` (the last row predicts nothing), printed."""
    import torch.nn.functional as F

    def nll(logits: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[:-1], torch.tensor(targets)))

    diff = (fast - exact).abs().max().item()
    agree = (fast.argmax(-1) == exact.argmax(-1)).float().mean().item()
    print(f"{what}: max |diff| {diff:.2e}, top-1 agreement {agree:.3f}, NLL {nll(fast):.5f} vs {nll(exact):.5f}")
    return diff, agree, nll(fast), nll(exact)


def test_auto_picks_the_fast_prefill_dtype(model_path) -> None:
    from gemmakit.quant.linear import cpu_has_native_bf16

    auto = gemmakit.load(model_path)
    want = torch.bfloat16 if cpu_has_native_bf16() else torch.int8 if "avx512bw" in cpu_flags() else torch.float32
    assert {m.prefill_dtype for m in auto.model.modules() if isinstance(m, QuantWeight)} == {want}


def test_memory_budget_fails_before_allocating(model_path) -> None:
    with pytest.raises(ModelTooLargeError, match="more than the memory budget of 100 MiB"):
        gemmakit.load(model_path, memory_budget=100 * 2**20)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_kernel_split_equals_reference_split(qtype: T, monkeypatch) -> None:
    """The C converter (used at load) gives exactly the PyTorch splitter's values, scales and mins."""
    rng = np.random.default_rng(100 + int(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    N, K = 40, 2 * max(block_size, 256)
    raw = torch.from_numpy(random_blocks(qtype, N * K // block_size, rng).reshape(N, -1))
    fast = split_packed(raw, qtype, (N, K))
    monkeypatch.setenv("GEMMAKIT_NO_KERNELS", "1")
    kernels_module.kernels.cache_clear()
    try:
        ref = split_packed(raw, qtype, (N, K))
    finally:
        monkeypatch.delenv("GEMMAKIT_NO_KERNELS")
        kernels_module.kernels.cache_clear()
    # Formats with one fp16 scale per block keep it as float16 (exact); K-quants keep ggml's two factors (the
    # fp16 super-block scale as float32, the 6- or 8-bit sub-scale as int8), whose products are the reference's.
    two_level = qtype in (T.Q4_K, T.Q6_K)
    assert fast[1].dtype == (torch.uint8 if two_level else torch.float16)
    flat = lambda t: expand_two_level(t, fast[3]) if two_level and t is not None else t  # noqa: E731
    assert torch.equal(fast[0], ref[0]) and torch.equal(flat(fast[1]), ref[1]) and fast[3:] == ref[3:]
    assert (fast[2] is None) == (ref[2] is None) and (fast[2] is None or torch.equal(flat(fast[2]), ref[2]))
    if two_level:  # 0.09 (Q4_K) / 0.08 (Q6_K) bytes of scales and mins per weight instead of 0.25
        nbytes = lambda t: t.nbytes if t is not None else 0  # noqa: E731
        assert nbytes(fast[1]) + nbytes(fast[2]) < 0.4 * (nbytes(ref[1]) + nbytes(ref[2]))
    # Rows that do not fill the last block of 16 are padded with zeros.
    padded = split_packed(raw[:37], qtype, (37, K))
    want = pack(*split(raw[:37], qtype, (37, K))[:3], bits=padded[4])
    assert padded[4] == (4 if qtype == T.Q4_K else 8)  # Q4_K's unsigned 4-bit values: two to a byte
    padded = (padded[0], flat(padded[1]), flat(padded[2]))
    assert all((a is None and b is None) or torch.equal(a.float(), b.float()) for a, b in zip(padded, want))


@pytest.mark.parametrize("group,mins,K,bits", [(32, False, 640, 8), (32, True, 2048, 8), (32, False, 672, 8),
                                               (16, False, 2048, 8), (32, True, 2048, 4)])
def test_kernel_rows_do_not_depend_on_the_batch(group, mins, K, bits) -> None:
    """Bitwise: a row's result is the same alone, in a block of four, or in any batch up to 16 (what keeps
    greedy output the same whether a request runs alone or batched in the server), and in the engine's larger
    steps of one-token rows, which the kernel takes in tiles of 16 rows (the 40 rows here: 16, 16 and 8)."""
    g = torch.Generator().manual_seed(group + K)
    N = 300
    low, high = (0, 16) if bits == 4 else (-30, 30)
    w = QuantWeight(torch.randint(low, high, (N, K), dtype=torch.int8, generator=g),
                    torch.rand(N, K // group, generator=g), torch.rand(N, K // group, generator=g) if mins else None,
                    group, bits)
    x = torch.randn(16, K, generator=g)
    full = w.matmul(x)
    for B in (1, 3, 4, 5, 8, 13):
        assert torch.equal(w.matmul(x[:B]), full[:B])
    assert torch.equal(torch.cat([w.matmul(x[i : i + 1]) for i in range(16)]), full)
    assert torch.equal(w.matmul(x[5:12]), full[5:12])
    steps = torch.randn(40, 1, K, generator=g)  # one-token rows: the kernel whatever their number
    batched = w.matmul(steps)
    assert torch.equal(batched[:16], w.matmul(steps[:16]))
    assert torch.equal(torch.cat([w.matmul(steps[i : i + 1]) for i in range(40)]), batched)
    assert torch.equal(w.matmul(steps[9:26]), batched[9:26])
    ref = (steps[:, 0] @ w.dequantize().T).unsqueeze(1)  # and the values themselves: x rounded to 16 bits
    assert torch.allclose(batched, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("bits", [8, 4])
def test_packed_dequantize_is_exact(bits: int) -> None:
    """Every row of a packed matrix (partial last block of 16 included) dequantizes exactly, as float32 and as
    bfloat16, whole or by row ids, with the C kernels and with the PyTorch fallback."""
    g = torch.Generator().manual_seed(bits)
    N, K, group = 37, 640, 32
    q = torch.randint(0, 16, (N, K), dtype=torch.int8, generator=g) if bits == 4 else torch.randint(
        -128, 128, (N, K), dtype=torch.int8, generator=g)
    scale, mins = torch.randn(N, K // group, generator=g), torch.randn(N, K // group, generator=g)
    w = QuantWeight(q, scale, mins, group, bits)
    dense = scale.repeat_interleave(group, 1) * q.float() - mins.repeat_interleave(group, 1)
    rows = torch.tensor([36, 0, 15, 16, 14])
    assert torch.equal(w.dequantize(), dense) and torch.equal(w.dequantize(rows), dense[rows])
    assert torch.equal(w.dequantize(dtype=torch.bfloat16), dense.bfloat16())
    from gemmakit.quant.linear import unpack

    assert torch.equal(unpack(w.q, w.scale, w.mins, N, K, bits)[0], q)


def test_kernel_propagates_nan_and_inf() -> None:
    """A non-finite input makes its row's outputs NaN, as float arithmetic would, never arbitrary numbers; the
    other rows of the batch are untouched."""
    g = torch.Generator().manual_seed(3)
    w = QuantWeight(torch.randint(-5, 5, (32, 64), dtype=torch.int8, generator=g), torch.rand(32, 2, generator=g),
                    None, 32)
    x = torch.randn(3, 64, generator=g)
    clean = w.matmul(x)
    x[1, 5], x[2, 40] = float("nan"), float("inf")
    y = w.matmul(x)
    assert y[1:].isnan().all() and torch.equal(y[0], clean[0])


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_matmul_by_slabs_equals_whole_weight(qtype: T, dtype: torch.dtype, monkeypatch) -> None:
    """Prompt chunks multiply the weight a dequantized slab of rows at a time; the product is the one of the
    whole dequantized weight (the last slab partial, the slabs starting inside the packed blocks' pointers)."""
    from gemmakit.quant import linear

    rng = np.random.default_rng(7 + int(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    N, K = 200, 512
    raw = torch.from_numpy(random_blocks(qtype, N * K // block_size, rng).reshape(N, -1))
    weight = QuantWeight.from_packed(*split_packed(raw, qtype, (N, K)), N, K)
    weight.prefill_dtype = dtype
    x = torch.randn(40, K, generator=torch.Generator().manual_seed(1))
    whole = torch.nn.functional.linear(x.to(dtype), weight.dequantize(dtype=dtype))
    monkeypatch.setattr(linear, "SLAB_MIN_ROWS", 48)
    monkeypatch.setattr(linear, "SLAB_BYTES", 0)
    assert linear._slab_rows(K, dtype) == 48 < N  # 5 slabs, the last one 8 rows
    by_slabs = weight.matmul(x)
    assert by_slabs.shape == (40, N) and by_slabs.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(by_slabs, whole.float(), rtol=tol, atol=tol * float(whole.float().abs().max()))


def test_experts_decode_in_c_matches_the_loop_and_is_batch_invariant() -> None:
    """A decode step's expert block in one C call: within rounding of the PyTorch loop over experts (the C GeGLU
    against PyTorch's GELU), each row bitwise the same alone or in a batch, and each row's k experts summed in
    ascending id order whatever order the router gave them in."""
    from gemmakit.quant.linear import QuantExperts

    g = torch.Generator().manual_seed(11)
    n, E, F_, k = 6, 64, 96, 3

    def matrix(N: int, K: int, bits: int) -> QuantWeight:
        low, high = (0, 16) if bits == 4 else (-40, 40)
        return QuantWeight(torch.randint(low, high, (N, K), dtype=torch.int8, generator=g),
                           torch.rand(N, K // 32, generator=g) / 50, torch.rand(N, K // 32, generator=g) / 50, 32,
                           bits)

    experts = QuantExperts([matrix(2 * F_, E, 4 if e % 2 else 8) for e in range(n)],
                           [matrix(E, F_, 8) for _ in range(n)])
    assert experts._tables() is not None  # the C path is the one under test
    x = torch.randn(5, E, generator=g)
    ids = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(5)])
    weights = torch.rand(5, k, generator=g)
    fast = experts(x, weights, ids, one_token_rows=True)
    loop = experts(x, weights, ids, one_token_rows=False)
    assert (fast - loop).abs().max().item() <= 1e-4 * loop.abs().max().item()
    assert torch.equal(torch.cat([experts(x[i : i + 1], weights[i : i + 1], ids[i : i + 1], True) for i in range(5)]),
                       fast)
    shuffled = torch.flip(ids, dims=[1]), torch.flip(weights, dims=[1])
    assert torch.equal(experts(x, shuffled[1], shuffled[0], True), fast)


def _int8_reference(x: torch.Tensor, dense: torch.Tensor, group: int = 32) -> torch.Tensor:
    """x rounded to 8 bits per group as csrc/qgemm.c and qgemv.c's 8-bit decode round it (scale max|x| / 127,
    half to even, in float32), times the dequantized weight, in float64."""
    groups = x.view(x.shape[0], -1, group)
    amax = groups.abs().amax(-1, keepdim=True)
    q = torch.round(groups * torch.where(amax > 0, 127 / amax, 0.0))
    return (q.double() * (amax / 127).double()).view_as(x) @ dense.double().t()


@pytest.mark.skipif("avx512bw" not in cpu_flags(), reason="the 8-bit prompt kernel is AVX-512 only (float32 elsewhere)")
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q4_1], ids=lambda t: t.name)
def test_int8_prompt_product_is_exact_for_x_rounded_to_8_bits(qtype: T) -> None:
    """Prompt chunks with 4-bit weights and prefill_dtype int8 (csrc/qgemm.c): the product of x rounded to 8
    bits per group with the dequantized weight, within float32 rounding; each row bitwise the same alone or in
    any chunk; a NaN reaches only its own row."""
    from gemmakit.kernels import kernels

    rng = np.random.default_rng(11 + int(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    N, K = 200, 512
    raw = random_blocks(qtype, N * K // block_size, rng).reshape(N, -1)
    weight = QuantWeight.from_packed(*split_packed(torch.from_numpy(raw), qtype, (N, K)), N, K)
    weight.prefill_dtype = torch.int8
    x = torch.randn(40, K, generator=torch.Generator().manual_seed(2))
    x[3, 64:96] = 0.0  # a group of zeros: step 0, values 0
    out = weight.matmul(x)
    via_kernel = weight._prefill_int8(kernels(), x)
    assert via_kernel is not None and torch.equal(out, via_kernel)  # the kernel ran, not the float32 fallback
    dense = weight.dequantize()
    ref = _int8_reference(x, dense)
    assert (out.double() - ref).abs().max().item() <= 1e-5 * float(ref.abs().max())
    # against the exact float product: 8-bit rounding costs ~0.5% of the norm (llama.cpp's Q8 activations)
    exact = x.double() @ dense.double().t()
    assert 1e-3 < float((out.double() - exact).norm() / exact.norm()) < 1e-2
    lib = kernels()
    assert torch.equal(torch.cat([weight._prefill_int8(lib, x[i : i + 1]) for i in range(40)]), out)
    assert torch.equal(weight._prefill_int8(lib, x[7:30]), out[7:30])
    x[9, 100] = float("nan")
    poisoned = weight.matmul(x)
    assert poisoned[9].isnan().all() and torch.equal(poisoned[:9], out[:9]) and torch.equal(poisoned[10:], out[10:])


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q8_0], ids=lambda t: t.name)
def test_int8_prefill_leaves_8_bit_weights_in_float32(qtype: T) -> None:
    """Only 4-bit weights take the 8-bit prompt kernel; the others keep the float32 product, bit for bit."""
    rng = np.random.default_rng(3 + int(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    N, K = 64, 512
    raw = torch.from_numpy(random_blocks(qtype, N * K // block_size, rng).reshape(N, -1))
    weight = QuantWeight.from_packed(*split_packed(raw, qtype, (N, K)), N, K)
    x = torch.randn(40, K, generator=torch.Generator().manual_seed(4))
    exact = weight.matmul(x)
    weight.prefill_dtype = torch.int8
    assert torch.equal(weight.matmul(x), exact)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K, T.Q4_1], ids=lambda t: t.name)
def test_decode_x8_is_exact_for_x_rounded_to_8_bits(qtype: T) -> None:
    """Decode products with decode_x_bits 8 (csrc/qgemv.c: vpdpbusd with VNNI, plain C elsewhere, the same
    values): the product of x rounded to 8 bits per group with the dequantized weight, within float32 rounding,
    for int8 values (stored + 128 in the kernel) and 4-bit ones, groups of 32 and 16 (Q6_K); each row bitwise the
    same alone as in a batch of 19 (tiles of 8, 8 and 3 rows); a NaN reaches only its own row."""
    rng = np.random.default_rng(21 + int(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    N, K = 72, 512
    raw = random_blocks(qtype, N * K // block_size, rng).reshape(N, -1)
    weight = QuantWeight.from_packed(*split_packed(torch.from_numpy(raw), qtype, (N, K)), N, K)
    model = torch.nn.Sequential(weight)
    x = torch.randn(19, 1, K, generator=torch.Generator().manual_seed(5))
    x[4, 0, 32:64] = 0.0  # a group of zeros: step 0, values 0
    x16 = weight.matmul(x)
    set_decode_x_bits(model, 8)
    assert weight.kernel_flags & 8
    out = weight.matmul(x)
    dense = weight.dequantize()
    ref = _int8_reference(x.view(19, K), dense, weight.group).view(19, 1, N)
    assert (out.double() - ref).abs().max().item() <= 1e-5 * float(ref.abs().max())
    exact = x.double() @ dense.double().t()
    assert 1e-3 < float((out.double() - exact).norm() / exact.norm()) < 1e-2  # llama.cpp's Q8 activations' cost
    assert float((x16.double() - exact).norm() / exact.norm()) < 1e-4  # the 16-bit default keeps ~1e-5
    assert torch.equal(torch.cat([weight.matmul(x[i : i + 1]) for i in range(19)]), out)
    x[9, 0, 100] = float("nan")
    poisoned = weight.matmul(x)
    assert poisoned[9].isnan().all() and torch.equal(poisoned[:9], out[:9]) and torch.equal(poisoned[10:], out[10:])
    set_decode_x_bits(model, 16)
    assert torch.equal(weight.matmul(x[:9]), x16[:9])
    with pytest.raises(InvalidParameterError, match="8 or 16"):
        set_decode_x_bits(model, 4)


def test_decode_x_bits_is_chosen_at_load(model_path) -> None:
    """16-bit decode x unless load(decode_x_bits=8) asks for llama.cpp's precision; the kernels say whether they
    run 8-bit x natively (built for this CPU: AVX-512 VNNI)."""
    from gemmakit.kernels import kernels

    assert decode_x8_native() == ({"avx512bw", "avx512_vnni"} <= cpu_flags())
    assert bool(kernels().gemmakit_kernels_features() & 1) == decode_x8_native()
    bits = lambda llm: {m.decode_x_bits for m in llm.model.modules() if isinstance(m, QuantWeight)}  # noqa: E731
    assert bits(gemmakit.load(model_path)) == {16}
    assert bits(gemmakit.load(model_path, decode_x_bits=8)) == {8}
    with pytest.raises(InvalidParameterError, match="decode_x_bits=12"):
        gemmakit.load(model_path, decode_x_bits=12)


def test_decode_x8_tracks_x16(model_path) -> None:
    """8-bit decode x against 16-bit on the default model, token by token through the fused C layer loop over
    ~260 tokens of prose (teacher forcing). Stated bounds, measured (AMD EPYC Zen 4): max |logits diff| 2.15
    (|logits| up to ~50), top-1 agreement 97.7%, mean NLL +0.28%. Switching back and forth on a loaded model (its
    C layer table rebuilt) gives each setting's logits bitwise."""
    from gemmakit.generate import decode_step, prefill
    from gemmakit.kv_cache import KVCache
    from test_model_parity import TEXT

    llm = gemmakit.load(model_path, quant="int8")
    ids = llm.tokenizer.encode(TEXT, add_bos=True)

    def decode_logits() -> torch.Tensor:
        cache = KVCache(llm.config, 1, len(ids))
        prefill(llm.model, ids[:1], cache)
        return torch.stack([decode_step(llm.model, ids[t], t, cache) for t in range(1, len(ids))])

    x16 = decode_logits()
    set_decode_x_bits(llm.model, 8)
    x8 = decode_logits()
    set_decode_x_bits(llm.model, 16)
    assert torch.equal(decode_logits(), x16)

    diff, agree, nll8, nll16 = _logits_against(x8, x16, ids[2:], "8-bit vs 16-bit decode x")
    assert 0 < diff <= 3.0
    assert agree >= 0.95
    assert abs(nll8 - nll16) <= 0.005 * nll16  # the accuracy bar for speed work
