"""Weights that stay quantized in memory: int8 values with a float32 scale (and min) per group of 16 or 32.

Every GGML quant type maps onto this layout exactly (see ggml.split). Small batches (decode: up to 16 rows)
multiply straight from int8 with the C kernel, reading the weight once for all rows; larger ones (prefill)
dequantize the weight to float32 and use PyTorch's matmul.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import kernels

MAX_KERNEL_ROWS = 16  # MAXB in csrc/qgemv.c


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


class QuantWeight(nn.Module):
    """A (N, K) matrix as int8 ``q`` (N, K), ``scale`` (N, K / group) and optional ``mins``."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, group: int) -> None:
        super().__init__()
        # Not persistent: they are filled from the checkpoint by the loader, not through load_state_dict.
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("mins", mins, persistent=False)
        self.group = group

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.q, self.scale, self.mins) if t is not None)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 values of all rows, or of the given row ids (an embedding lookup)."""
        q, scale, mins = self.q, self.scale, self.mins
        lib = kernels()
        n_rows = q.shape[0] if rows is None else rows.numel()
        if lib is not None and q.device.type == "cpu":
            out = torch.empty(n_rows, q.shape[1], dtype=torch.float32)
            ids = rows.reshape(-1).to(torch.int64).contiguous() if rows is not None else None
            lib.dequant_rows(_ptr(q), _ptr(scale), _ptr(mins), _ptr(out), q.shape[1], self.group, _ptr(ids), n_rows,
                             torch.get_num_threads())
            return out
        if rows is not None:
            q, scale = q[rows.reshape(-1)], scale[rows.reshape(-1)]
            mins = mins[rows.reshape(-1)] if mins is not None else None
        n, K = q.shape
        values = scale.unsqueeze(-1) * q.view(n, K // self.group, self.group).float()
        if mins is not None:
            values = values - mins.unsqueeze(-1)
        return values.view(n, K)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) float32 -> (..., N) float32."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1]).float().contiguous()
        lib = kernels()
        if lib is not None and flat.shape[0] <= MAX_KERNEL_ROWS and flat.device.type == "cpu":
            B, K = flat.shape
            N = self.q.shape[0]
            y = torch.empty(B, N, dtype=torch.float32)
            xs = torch.empty(B, K // self.group, dtype=torch.float32) if self.mins is not None else None
            status = lib.qgemv(_ptr(self.q), _ptr(self.scale), _ptr(self.mins), _ptr(flat), _ptr(xs), _ptr(y),
                               B, N, K, self.group, torch.get_num_threads())
            if status == 0:
                return y.view(*lead, N)
        return F.linear(flat, self.dequantize()).view(*lead, -1)


class QuantLinear(nn.Module):
    """Drop-in for a bias-free nn.Linear whose weight stays quantized."""

    def __init__(self, weight: QuantWeight) -> None:
        super().__init__()
        self.qweight = weight
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qweight.matmul(x).to(x.dtype)


class QuantEmbedding(nn.Module):
    """Token embedding that is also the tied output head, both read from the quantized table."""

    def __init__(self, weight: QuantWeight) -> None:
        super().__init__()
        self.qweight = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.compute_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight.dequantize(ids).view(*ids.shape, self.embedding_dim)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.qweight.matmul(hidden)
