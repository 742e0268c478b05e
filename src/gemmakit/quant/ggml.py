"""GGML block formats dequantized in PyTorch.

Each function takes raw blocks as a uint8 tensor of shape (n_blocks, type_size) and returns float32 values of
shape (n_blocks, block_size). The arithmetic follows ggml's reference dequantizers (and the `gguf` package's
numpy port) operation for operation, so results are bit-exact: the tests check that on random blocks.

Layouts (ggml-common.h): fp16 scales are little endian; "qs" nibbles hold element j in the low nibble and
element j + half in the high nibble; K-quants use 256-element super-blocks with 6-bit packed sub-block scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from ..errors import UnsupportedModelError

QK_K = 256

Dequantizer = Callable[[torch.Tensor], torch.Tensor]
_DEQUANTIZERS: dict[T, Dequantizer] = {}


def _register(qtype: T) -> Callable[[Dequantizer], Dequantizer]:
    def wrap(fn: Dequantizer) -> Dequantizer:
        _DEQUANTIZERS[qtype] = fn
        return fn

    return wrap


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2k) uint8 -> (n, k) float32 from little-endian fp16."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, m) packed bytes -> (n, 2m): low nibbles of all bytes, then high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """(n, m) bytes -> (n, 8m) bits, little-endian bit order (bit i of the word is element i)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(b.shape[0], -1)


@_register(T.F32)
def _deq_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.float32)


@_register(T.F16)
def _deq_f16(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks)


@_register(T.BF16)
def _deq_bf16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.contiguous().view(torch.bfloat16).float()


# Every quantized type splits into int8 values, one float32 scale per group and, for the affine formats, one
# float32 "min" per group: value = scale * q - min. The scales are computed exactly as ggml's reference computes
# them (e.g. d * sc for K-quants), so scale * q - min reproduces the reference dequantization bit for bit.


@dataclass
class Split:
    q: torch.Tensor  # (n_blocks, block_size) int8
    scale: torch.Tensor  # (n_blocks, groups_per_block) float32
    mins: torch.Tensor | None  # (n_blocks, groups_per_block) float32, or None for symmetric formats
    group: int


_SPLITTERS: dict[T, Callable[[torch.Tensor], Split]] = {}


def _register_split(qtype: T) -> Callable[[Callable[[torch.Tensor], Split]], Callable[[torch.Tensor], Split]]:
    def wrap(fn: Callable[[torch.Tensor], Split]) -> Callable[[torch.Tensor], Split]:
        _SPLITTERS[qtype] = fn
        _DEQUANTIZERS[qtype] = lambda blocks: _combine(fn(blocks))
        return fn

    return wrap


def _combine(sp: Split) -> torch.Tensor:
    n, block = sp.q.shape
    groups = block // sp.group
    values = sp.scale.reshape(n, groups, 1) * sp.q.reshape(n, groups, sp.group).float()
    if sp.mins is not None:
        values = values - sp.mins.reshape(n, groups, 1)
    return values.reshape(n, block)


@_register_split(T.Q8_0)
def _split_q8_0(blocks: torch.Tensor) -> Split:
    return Split(blocks[:, 2:].contiguous().view(torch.int8), _f16(blocks[:, :2]), None, 32)


@_register_split(T.Q4_0)
def _split_q4_0(blocks: torch.Tensor) -> Split:
    return Split(_nibbles(blocks[:, 2:]).to(torch.int8) - 8, _f16(blocks[:, :2]), None, 32)


@_register_split(T.Q4_1)
def _split_q4_1(blocks: torch.Tensor) -> Split:
    # value = d * q + m, written as d * q - (-m) (exact in floating point)
    return Split(_nibbles(blocks[:, 4:]).to(torch.int8), _f16(blocks[:, :2]), -_f16(blocks[:, 2:4]), 32)


def _q5_values(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    # The 5th bit of element i is bit i of the 32-bit qh word.
    return _nibbles(qs) | (_bits(qh) << 4)


@_register_split(T.Q5_0)
def _split_q5_0(blocks: torch.Tensor) -> Split:
    return Split(_q5_values(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16, _f16(blocks[:, :2]), None, 32)


@_register_split(T.Q5_1)
def _split_q5_1(blocks: torch.Tensor) -> Split:
    q = _q5_values(blocks[:, 4:8], blocks[:, 8:]).to(torch.int8)
    return Split(q, _f16(blocks[:, :2]), -_f16(blocks[:, 2:4]), 32)


@_register_split(T.Q2_K)
def _split_q2_k(blocks: torch.Tensor) -> Split:
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    # Two 128-element halves; in each, 32 bytes carry four 2-bit planes (shift 0, 2, 4, 6).
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    q = ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, QK_K).to(torch.int8)
    return Split(q, d * (scales & 0xF).float(), dmin * (scales >> 4).float(), 16)


@_register_split(T.Q3_K)
def _split_q3_k(blocks: torch.Tensor) -> Split:
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    # 16 six-bit scales: low 4 bits from bytes 0..7 (low nibble then high), high 2 bits from bytes 8..11.
    low = torch.cat([scales[:, :8] & 0x0F, scales[:, :8] >> 4], dim=-1)
    hs = scales[:, 8:12].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 4, 1)
    sc = (low | ((hs.reshape(n, 16) & 3) << 4)).to(torch.int8) - 32
    ql = (qs.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
    qh = (hmask.reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1
    # A set hmask bit means "no -4 offset".
    q = ql.reshape(n, 16, 16).to(torch.int8) - ((qh.reshape(n, 16, 16) ^ 1) << 2).to(torch.int8)
    return Split(q.reshape(n, QK_K), d * sc.float(), None, 16)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte, 8 x (6-bit scale, 6-bit min) field of Q4_K / Q5_K."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


@_register_split(T.Q4_K)
def _split_q4_k(blocks: torch.Tensor) -> Split:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    # Four 64-element chunks, each 32 bytes: low nibbles are elements 0..31, high nibbles 32..63.
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, QK_K).to(torch.int8)
    return Split(q, d * sc.float(), dmin * mn.float(), 32)


@_register_split(T.Q5_K)
def _split_q5_k(blocks: torch.Tensor) -> Split:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    ql = (qs.reshape(n, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)) & 0x0F
    hb = (qh.reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1
    q = (ql.reshape(n, 8, 32) | (hb.reshape(n, 8, 32) << 4)).reshape(n, QK_K).to(torch.int8)
    return Split(q, d * sc.float(), dmin * mn.float(), 32)


@_register_split(T.Q6_K)
def _split_q6_k(blocks: torch.Tensor) -> Split:
    n = blocks.shape[0]
    ql, qh, scales = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
    d = _f16(blocks[:, 208:210])
    lo = (ql.reshape(n, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)) & 0x0F
    hi = (qh.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
    q = (lo.reshape(n, 8, 32) | (hi.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return Split(q.reshape(n, QK_K), d * scales.contiguous().view(torch.int8).float(), None, 16)


SUPPORTED_TYPES: frozenset[T] = frozenset(_DEQUANTIZERS)
QUANTIZED_TYPES: frozenset[T] = frozenset(_SPLITTERS)


SPLIT_ROWS = 8192  # rows converted at a time: bounds the temporaries of the bit unpacking
# The C kernel converts these formats in one pass (the PyTorch splitters above stay the reference).
_KERNEL_SPLIT = {T.Q8_0: (32, False), T.Q4_0: (32, False), T.Q5_0: (32, False), T.Q4_K: (32, True),
                 T.Q6_K: (16, False)}
# Formats whose block scale (and min) is one fp16 number: packed as float16, exactly.
FP16_SCALE_TYPES = {T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_1, T.Q5_1}
# K-quants multiply an fp16 super-block scale by small integers, which float16 cannot always hold: the C
# converter keeps both factors (two-level scales, see linear.KS_COLS); the PyTorch splitters give float32 products.
TWO_LEVEL_TYPES = {T.Q4_K, T.Q6_K}
# Formats of unsigned 4-bit values (with mins): packed two to a byte, half the memory of the int8 layout.
NIBBLE_TYPES = {T.Q4_K, T.Q4_1}


def _split_with_kernel(raw: torch.Tensor, qtype: T, rows: int, K: int):
    from ..kernels import kernels
    from .linear import KS_COLS, two_level_bytes

    lib = kernels()
    block_size = GGML_QUANT_SIZES[qtype][0]
    if lib is None or qtype not in _KERNEL_SPLIT or K % block_size:
        return None
    import ctypes

    group, affine = _KERNEL_SPLIT[qtype]
    raw = raw.contiguous()
    blocks = (rows + 15) // 16
    bits = 4 if qtype in NIBBLE_TYPES else 8
    q = torch.empty(blocks, bits * 2 * K, dtype=torch.uint8 if bits == 4 else torch.int8)
    if qtype in TWO_LEVEL_TYPES:  # the converter writes every byte, padding rows as zeros
        scale = torch.empty(blocks, K // KS_COLS * two_level_bytes(group), dtype=torch.uint8)
    else:
        scale = torch.empty(blocks, 16 * (K // group), dtype=torch.float16)
    mins = torch.empty_like(scale) if affine else None
    ptr = lambda t: ctypes.c_void_p(t.data_ptr()) if t is not None else None  # noqa: E731
    status = lib.split_blocks(int(qtype), ptr(raw), rows, K, ptr(q), ptr(scale), ptr(mins), int(bits == 4),
                              torch.get_num_threads())
    return (q, scale, mins, group, bits) if status == 0 else None


def _split_rows(raw: torch.Tensor, qtype: T) -> Split:
    return _SPLITTERS[qtype](raw.reshape(-1, GGML_QUANT_SIZES[qtype][1]))


def split(raw: torch.Tensor, qtype: T, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """A quantized matrix's raw bytes (rows, row_bytes) -> row-major (q (rows, K) int8, scale (rows, K/group),
    mins or None, group), with the PyTorch splitters (the reference for the C converter of split_packed)."""
    rows, K = shape
    sp = _split_rows(raw, qtype)
    mins = sp.mins.reshape(rows, -1) if sp.mins is not None else None
    return sp.q.reshape(rows, K), sp.scale.reshape(rows, -1), mins, sp.group


def split_packed(raw: torch.Tensor, qtype: T, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int, int]:
    """A quantized matrix's raw bytes -> (q, scale, mins or None, group, bits) in the packed layout of
    :class:`~gemmakit.quant.linear.QuantWeight` (csrc/qgemv.c). The C converter writes it in one pass; other
    types are split and packed in row chunks, so a large table never needs several full-size temporaries."""
    from .linear import pack

    rows, K = shape
    fast = _split_with_kernel(raw, qtype, rows, K)
    if fast is not None:
        return fast
    raw = raw.reshape(rows, -1)
    parts: list[tuple[torch.Tensor, ...]] = []
    group = 0
    bits = 4 if qtype in NIBBLE_TYPES else 8
    for start in range(0, rows, SPLIT_ROWS):  # SPLIT_ROWS is a multiple of 16: chunks pack independently
        chunk = raw[start : start + SPLIT_ROWS]
        n = chunk.shape[0]
        sp = _split_rows(chunk, qtype)
        group = sp.group
        scale = sp.scale.reshape(n, -1)
        mins = sp.mins.reshape(n, -1) if sp.mins is not None else None
        if qtype in FP16_SCALE_TYPES:  # exact: they were fp16 numbers in the file
            scale, mins = scale.half(), mins.half() if mins is not None else None
        parts.append(pack(sp.q.reshape(n, K), scale, mins, bits))
    q = torch.cat([p[0] for p in parts])
    scale = torch.cat([p[1] for p in parts])
    mins = torch.cat([p[2] for p in parts]) if parts[0][2] is not None else None
    return q, scale, mins, group, bits


def dequantize(raw: torch.Tensor, qtype: T, shape: tuple[int, ...], name: str = "tensor") -> torch.Tensor:
    """Dequantize a GGML tensor's raw bytes to float32.

    Args:
        raw: uint8 tensor holding exactly the tensor's bytes (any shape).
        qtype: the GGML type of the data.
        shape: the logical shape, PyTorch order (rows..., row length).
        name: used in error messages.

    Raises:
        UnsupportedModelError: ``qtype`` is not a type gemmakit can dequantize.
    """
    fn = _DEQUANTIZERS.get(qtype)
    if fn is None:
        raise UnsupportedModelError(
            f"{name}: GGML type {qtype.name} is not supported (supported: "
            f"{', '.join(sorted(t.name for t in SUPPORTED_TYPES))})"
        )
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    return fn(blocks).reshape(shape)
