"""Float matrices -> quantized weights while loading (``gemmakit.load(folder, quant="int8" | "int4")``).

"int8" is Q8_0 (int8 values, one fp16 scale per 32), "int4" is Q4_1 (unsigned 4-bit values, an fp16 scale and
min per 32, two values to a byte), computed in PyTorch with the float32 operations of ggml's reference
quantizers (gguf-py's ``quants``, bit-exact with llama.cpp's C code; tests/test_quant_hf.py holds them equal) and
about ten times faster than gguf-py's numpy. The values and scales are what the GGUF splitter reads from those
blocks, so a checkpoint quantized here holds exactly the weights of the same checkpoint written as a Q8_0 / Q4_1
GGUF. Rows are read, quantized and packed a slice at a time into preallocated buffers: the peak memory of a
matrix is its packed size plus one slice, never its float copy.
"""

from __future__ import annotations

from typing import Callable

import torch

from .linear import QuantWeight, pack

QUANT_TYPES = {"int8": "Q8_0", "int4": "Q4_1"}
BLOCK = 32  # weights per block of both types
Blocks = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # q (rows, K) int8, scale and mins (rows, K/32)


def q8_0_blocks(x: torch.Tensor) -> Blocks:
    """Q8_0 of float32 rows (rows, K): ggml's quantize_row_q8_0_ref, operation for operation."""
    rows, K = x.shape
    b = x.view(rows, K // BLOCK, BLOCK)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    v = b * inv
    a = v.abs()
    whole = a.floor()
    q = torch.sign(v) * (whole + (2 * (a - whole)).floor())  # round half away from zero (gguf's np_roundf)
    return q.to(torch.int8).view(rows, K), d.view(rows, -1).half(), None


def q4_1_blocks(x: torch.Tensor) -> Blocks:
    """Q4_1 of float32 rows (rows, K) as value = d * q - (-m): ggml's quantize_row_q4_1_ref, with the scale and
    the negated min the GGUF splitter gives (fp16, exactly)."""
    rows, K = x.shape
    b = x.view(rows, K // BLOCK, BLOCK)
    hi, lo = b.amax(-1, keepdim=True), b.amin(-1, keepdim=True)
    d = (hi - lo) / 15
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = ((b - lo) * inv + 0.5).trunc().clamp_(0, 15)
    return q.to(torch.int8).view(rows, K), d.view(rows, -1).half(), -lo.view(rows, -1).half()
SLICE_VALUES = 1 << 18  # float values quantized at a time: 1 MiB of float32, ~6 MiB with its temporaries
_QUANTIZERS = {"int8": (q8_0_blocks, 8), "int4": (q4_1_blocks, 4)}


def quantize_matrix(read_rows: Callable[[int, int], torch.Tensor], rows: int, K: int, kind: str) -> QuantWeight:
    """The (rows, K) matrix that ``read_rows(start, stop)`` gives slice by slice, as a :class:`QuantWeight` of
    ``kind`` ("int8" or "int4")."""
    quantize, bits = _QUANTIZERS[kind]
    step = max(16, SLICE_VALUES // K // 16 * 16)  # whole blocks of 16 rows: slices pack independently
    out: list[torch.Tensor | None] = []
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        packed = pack(*quantize(read_rows(start, stop).float().contiguous()), bits)
        if not out:  # the first slice tells the packed widths and dtypes
            blocks = (rows + 15) // 16
            out = [torch.empty(blocks, *t.shape[1:], dtype=t.dtype) if t is not None else None for t in packed]
        for buffer, part in zip(out, packed):
            if buffer is not None:
                buffer[start // 16 : start // 16 + part.shape[0]] = part
    return QuantWeight.from_packed(out[0], out[1], out[2], BLOCK, bits, rows, K)


# -- GGUF block bytes ---------------------------------------------------------------------------------------

def q8_0_bytes(x: torch.Tensor) -> torch.Tensor:
    """Float32 rows (rows, K) as GGUF Q8_0 blocks, (rows, K/32 * 34) uint8: an fp16 scale, then 32 int8."""
    q, d, _ = q8_0_blocks(x)
    rows, nb = d.shape
    return torch.cat([d.contiguous().view(torch.uint8).view(rows, nb, 2),
                      q.view(torch.uint8).view(rows, nb, BLOCK)], dim=-1).view(rows, -1)


def q4_1_bytes(x: torch.Tensor) -> torch.Tensor:
    """Float32 rows (rows, K) as GGUF Q4_1 blocks, (rows, K/32 * 20) uint8: fp16 scale and min, then 16 bytes
    whose low nibbles hold values 0-15 and high nibbles values 16-31."""
    q, d, neg_min = q4_1_blocks(x)
    assert neg_min is not None
    rows, nb = d.shape
    v = q.view(rows, nb, BLOCK).to(torch.uint8)
    nibbles = v[..., :16] | (v[..., 16:] << 4)
    return torch.cat([d.contiguous().view(torch.uint8).view(rows, nb, 2),
                      (-neg_min).contiguous().view(torch.uint8).view(rows, nb, 2), nibbles], dim=-1).view(rows, -1)


# Parameters whose rows are whole 32-blocks but that stay float: llama.cpp keeps the MoE router (ffn_gate_inp)
# in float32 too, since a rounded router can pick other experts.
KEPT_FLOAT = ("router.proj.weight",)
# Gemma 4's stacked expert matrices (experts, rows, K): quantized row by row like any matrix.
EXPERT_MATRICES = ("experts.gate_up_proj", "experts.down_proj")


def quantized_parameter(name: str, shape: tuple[int, ...], is_matrix_module: bool) -> bool:
    """Whether a parameter is stored quantized (GGUF writer and quantize-at-load alike): the weight of a linear
    or embedding module, or an expert stack, whose rows are whole blocks, and not one of :data:`KEPT_FLOAT`."""
    if name.endswith(KEPT_FLOAT) or not shape or shape[-1] % BLOCK or 0 in shape:
        return False
    if name.endswith(EXPERT_MATRICES):
        return len(shape) == 3
    return len(shape) == 2 and is_matrix_module


BYTE_PACKERS = {"Q8_0": q8_0_bytes, "Q4_1": q4_1_bytes}
