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


def fast_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of a float32 CPU tensor in one C call (faster than PyTorch's eager norm at decode and prefill sizes)."""
    lib = kernels()
    if lib is None or (weight is not None and weight.dtype != torch.float32):
        w = weight.float() if weight is not None else None
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.rms_norm(_ptr(x), _ptr(weight), _ptr(out), x.numel() // x.shape[-1], x.shape[-1], eps)
    return out


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
        self._ptrs: tuple | None = None  # ctypes pointers of q, scale, mins (the tensors never move on CPU)

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
            if self._ptrs is None:
                self._ptrs = (_ptr(self.q), _ptr(self.scale), _ptr(self.mins))
            y = torch.empty(B, N, dtype=torch.float32)
            xs = torch.empty(B, K // self.group, dtype=torch.float32) if self.mins is not None else None
            status = lib.qgemv(*self._ptrs, _ptr(flat), _ptr(xs), _ptr(y), B, N, K, self.group,
                               torch.get_num_threads())
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


def concat_weights(weights: list[QuantWeight]) -> QuantWeight | None:
    """Stack matrices with the same input width and group layout into one (one kernel call instead of several)."""
    first = weights[0]
    if any(w.group != first.group or (w.mins is None) != (first.mins is None) or w.shape[1] != first.shape[1]
           for w in weights):
        return None
    mins = torch.cat([w.mins for w in weights]) if first.mins is not None else None
    return QuantWeight(torch.cat([w.q for w in weights]), torch.cat([w.scale for w in weights]), mins, first.group)


def fuse_projections(model: nn.Module) -> None:
    """Run q/k/v and gate/up as single matmuls where their quantized layouts allow it."""
    for module in model.modules():
        names = None
        if hasattr(module, "qkv_proj") and not getattr(module, "shared", True):
            names = ["q_proj", "k_proj"] + (["v_proj"] if module.v_proj is not None else [])
            target = "qkv_proj"
        elif hasattr(module, "gate_up_proj"):
            names, target = ["gate_proj", "up_proj"], "gate_up_proj"
        if not names or not all(hasattr(module, n) for n in names):
            continue  # e.g. MoE experts, whose gate_up_proj is a stored tensor, not a slot to fill
        parts = [getattr(module, n) for n in names]
        if not all(isinstance(p, QuantLinear) for p in parts):
            continue
        fused = concat_weights([p.qweight for p in parts])
        if fused is None:
            continue
        setattr(module, target, QuantLinear(fused))
        if target == "qkv_proj":
            module.qkv_sizes = [p.out_features for p in parts] + ([] if len(parts) == 3 else [0])
        for n in names:  # the fused copy replaces them; drop the originals' memory
            setattr(module, n, None)
