"""GGML block formats dequantized in PyTorch.

Each function takes raw blocks as a uint8 tensor of shape (n_blocks, type_size) and returns float32 values of
shape (n_blocks, block_size). The arithmetic follows ggml's reference dequantizers (and the `gguf` package's
numpy port) operation for operation, so results are bit-exact: the tests check that on random blocks.

Layouts (ggml-common.h): fp16 scales are little endian; "qs" nibbles hold element j in the low nibble and
element j + half in the high nibble; K-quants use 256-element super-blocks with 6-bit packed sub-block scales.
"""

from __future__ import annotations

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


@_register(T.Q8_0)
def _deq_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    return blocks[:, 2:].contiguous().view(torch.int8).float() * d


@_register(T.Q4_0)
def _deq_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return d * q.float()


@_register(T.Q4_1)
def _deq_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    return d * _nibbles(blocks[:, 4:]).float() + m


def _q5_values(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    # The 5th bit of element i is bit i of the 32-bit qh word.
    return _nibbles(qs) | (_bits(qh) << 4)


@_register(T.Q5_0)
def _deq_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = _q5_values(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16
    return d * q.float()


@_register(T.Q5_1)
def _deq_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    return d * _q5_values(blocks[:, 4:8], blocks[:, 8:]).float() + m


@_register(T.Q2_K)
def _deq_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    # Two 128-element halves; in each, 32 bytes carry four 2-bit planes (shift 0, 2, 4, 6).
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    q = ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


@_register(T.Q3_K)
def _deq_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    # 16 six-bit scales: low 4 bits from bytes 0..7 (low nibble then high), high 2 bits from bytes 8..11.
    low = torch.cat([scales[:, :8] & 0x0F, scales[:, :8] >> 4], dim=-1)
    hs = scales[:, 8:12].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 4, 1)
    sc = (low | ((hs.reshape(n, 16) & 3) << 4)).to(torch.int8) - 32
    dl = (d * sc.float()).reshape(n, 16, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
    qh = (hmask.reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1
    # A set hmask bit means "no -4 offset".
    q = ql.reshape(n, 16, 16).to(torch.int8) - ((qh.reshape(n, 16, 16) ^ 1) << 2).to(torch.int8)
    return (dl * q.float()).reshape(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte, 8 x (6-bit scale, 6-bit min) field of Q4_K / Q5_K."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


@_register(T.Q4_K)
def _deq_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc.float()).reshape(n, 8, 1)
    ml = (dmin * mn.float()).reshape(n, 8, 1)
    # Four 64-element chunks, each 32 bytes: low nibbles are elements 0..31, high nibbles 32..63.
    qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, QK_K)


@_register(T.Q5_K)
def _deq_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dl = (d * sc.float()).reshape(n, 8, 1)
    ml = (dmin * mn.float()).reshape(n, 8, 1)
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    ql = (qs.reshape(n, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)) & 0x0F
    hb = (qh.reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1
    q = (ql.reshape(n, 8, 32) | (hb.reshape(n, 8, 32) << 4)).float()
    return (dl * q - ml).reshape(n, QK_K)


@_register(T.Q6_K)
def _deq_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    ql, qh, scales = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208]
    d = _f16(blocks[:, 208:210])
    dl = (d * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    lo = (ql.reshape(n, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)) & 0x0F
    hi = (qh.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
    q = (lo.reshape(n, 8, 32) | (hi.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (dl * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


SUPPORTED_TYPES: frozenset[T] = frozenset(_DEQUANTIZERS)


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
