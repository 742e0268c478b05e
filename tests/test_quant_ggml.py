"""GGML dequantization must be bit-exact against the gguf package's reference (gguf.quants.dequantize)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants

from gemmakit.errors import UnsupportedModelError
from gemmakit.quant.ggml import SUPPORTED_TYPES, dequantize
from gemmakit.weights.gguf import GGUFFile

# Byte offsets of the fp16 scale fields inside one block, per type (ggml-common.h).
FP16_FIELDS = {
    T.Q8_0: [0],
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q2_K: [80, 82],
    T.Q3_K: [108],
    T.Q4_K: [0, 2],
    T.Q5_K: [0, 2],
    T.Q6_K: [208],
}
ALL_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]


def random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw blocks whose float fields are finite (so equality is meaningful, NaN-free)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    if qtype == T.F32:
        raw[:, 3::4] &= 0xBF  # clear the top exponent bit: no inf/NaN
    elif qtype in (T.F16, T.BF16):
        raw[:, 1::2] &= 0xBF
    for off in FP16_FIELDS.get(qtype, []):
        raw[:, off + 1] &= 0xBF
    return raw


def assert_bit_exact(ours: torch.Tensor, ref: np.ndarray) -> None:
    assert ours.dtype == torch.float32
    ref_bits = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32).view(np.int32))
    ours_bits = ours.contiguous().view(torch.int32)
    mismatched = int((ours_bits != ref_bits).sum())
    assert mismatched == 0, f"{mismatched} of {ref.size} values differ"


def test_every_listed_type_is_supported() -> None:
    assert set(ALL_TYPES) <= SUPPORTED_TYPES


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_random_blocks_bit_exact(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 24, 4
    raw = random_blocks(qtype, rows * blocks_per_row, rng).reshape(rows, blocks_per_row * type_size)
    shape = (rows, blocks_per_row * block_size)
    ref = quants.dequantize(raw, qtype)
    assert ref.shape == shape
    assert_bit_exact(dequantize(torch.from_numpy(raw), qtype, shape), ref)


@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_quantized_real_values_bit_exact(qtype: T) -> None:
    """Blocks produced by the reference quantizer from Gaussian weights (realistic scales)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 256)).astype(np.float32)
    raw = quants.quantize(x, qtype)
    assert_bit_exact(dequantize(torch.from_numpy(raw), qtype, x.shape), quants.dequantize(raw, qtype))


def test_default_model_tensors_bit_exact(model_path) -> None:
    """One tensor of each type in the bundled model (F32, Q8_0, Q5_0, Q4_K, Q6_K)."""
    gguf = GGUFFile(model_path)
    seen = set()
    for name, info in gguf.tensors.items():
        if info.ggml_type in seen or name == "token_embd.weight":
            continue
        seen.add(info.ggml_type)
        raw = gguf.tensor_bytes(name)
        ours = dequantize(torch.from_numpy(np.array(raw)), info.ggml_type, info.shape)
        assert_bit_exact(ours, quants.dequantize(np.array(raw), info.ggml_type))
    assert {t.name for t in seen} == {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}


def test_unsupported_type_raises() -> None:
    raw = torch.zeros(GGML_QUANT_SIZES[T.IQ4_NL][1], dtype=torch.uint8)
    with pytest.raises(UnsupportedModelError, match="IQ4_NL is not supported"):
        dequantize(raw, T.IQ4_NL, (32,), "blk.0.attn_q.weight")
