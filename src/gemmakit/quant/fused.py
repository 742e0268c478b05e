"""Fused CPU kernels (csrc/decode.c) for the decode step, and GeGLU / RMSNorm at any size, with the
conditions under which they apply.

At one token per row, a Gemma layer's attention is ~150 tiny PyTorch ops whose dispatch costs far more than
their arithmetic. These wrappers run the same math in one C call each: q/k/v norms + RoPE + cache write,
attention over the cache slots, and GeGLU. Callers keep the PyTorch path for everything these do not cover
(prefill chunks, non-float32 activations, GPUs, no C compiler); tests/test_fused_decode.py holds the two
paths to each other.
"""

from __future__ import annotations

import torch

from .kernels import kernels
from .linear import _ptr, kernel_rows

SPLIT_SLOTS = 256  # cache slots per split-K range of the decode attention
ENABLED = True  # tests switch this off to run the plain PyTorch decode path on the same model


def bf16_prompt(proj: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``proj`` (x) is a prompt-sized matmul that runs in bfloat16 (see QuantWeight.prefill_dtype), so
    the MLP can keep its activations in bfloat16 between its matmuls instead of widening them in between."""
    weight = getattr(proj, "qweight", None)
    return (weight is not None and weight.prefill_dtype == torch.bfloat16 and ENABLED and kernels() is not None
            and x.device.type == "cpu" and not kernel_rows(x))


def cpu_kernels_ok(x: torch.Tensor) -> bool:
    """True when the C kernels can take ``x``: float32 on the CPU, with the kernels built."""
    return ENABLED and x.dtype == torch.float32 and x.device.type == "cpu" and kernels() is not None


def fused_decode_ok(x: torch.Tensor) -> bool:
    """True when ``x`` (B, 1, E), one token per row, is a float32 CPU step the fused kernels can take."""
    return cpu_kernels_ok(x) and x.shape[1] == 1


def attn_prep(
    qkv: torch.Tensor,  # (B, 1, W) projections q|k|v (k, v absent on shared layers; v absent when K = V)
    n_heads: int,
    n_kv: int,
    head_dim: int,
    k_eq_v: bool,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    use_qk_norm: bool,
    use_v_norm: bool,
    eps: float,
    rope: tuple[torch.Tensor, torch.Tensor],  # cos, signed sin (B, 1, 1, D)
    cache_k: torch.Tensor | None,  # (B, S1, Hkv, D) or None on KV-shared layers
    cache_v: torch.Tensor | None,
    slot: torch.Tensor | None,  # (B, 1) cache slot of each row's new token
    rows: torch.Tensor | None = None,  # (B,) cache row of each token; None: token b -> row b
) -> torch.Tensor:  # (B, H, D) normalized, rotated queries
    B = qkv.shape[0]
    qkv = qkv.contiguous()
    cos, ssin = (t.contiguous() for t in rope)
    q = torch.empty(B, n_heads, head_dim)
    slot = slot.contiguous() if slot is not None else None
    rows = rows.contiguous() if rows is not None else None  # kept referenced: the kernel reads its memory
    kernels().attn_prep(
        _ptr(qkv), qkv.shape[-1], B, n_heads, n_kv, head_dim, int(k_eq_v),
        _ptr(q_weight), int(use_qk_norm), _ptr(k_weight), int(use_qk_norm), int(use_v_norm), eps,
        _ptr(cos), _ptr(ssin), _ptr(q), _ptr(cache_k), _ptr(cache_v),
        cache_k.shape[1] if cache_k is not None else 0, _ptr(slot), _ptr(rows),
        torch.get_num_threads(),
    )
    return q


def attends_in_place(k: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """Keys (B, K, Hkv, D) and their positions (B, K) are views into one cache the kernel can walk."""
    _, _, Hkv, D = k.shape
    return (k.stride(3) == 1 and k.stride(2) == D and k.stride(1) == Hkv * D and k_pos.stride(1) == 1
            and k.stride(0) % (Hkv * D) == 0 and k_pos.stride(0) == k.stride(0) // (Hkv * D))


def attend(
    q: torch.Tensor,  # (B, H, D)
    k: torch.Tensor,  # (B, K, Hkv, D) view of a cache
    v: torch.Tensor,
    k_pos: torch.Tensor,  # (B, K)
    q_pos: torch.Tensor,  # (B, 1)
    window: int | None,
    scale: float,
    softcap: float | None,
    rows: torch.Tensor | None = None,  # (B,) cache row each query reads (k, v, k_pos then cover all rows)
) -> torch.Tensor:  # (B, H * D)
    B, H, D = q.shape
    n_slots, Hkv = k.shape[1], k.shape[2]
    threads = torch.get_num_threads()
    # The slots are cut into fixed ranges done in parallel and merged (split-K). The ranges depend only on
    # slot numbers, never on the batch, so a row's result is the same whatever rows share the step.
    parts = max(1, -(-n_slots // SPLIT_SLOTS))
    out = torch.empty(B, H * D)
    scratch = torch.empty(B * H * parts * (D + 2))
    q_pos = q_pos.contiguous()
    rows = rows.contiguous() if rows is not None else None
    kernels().attend_decode(
        _ptr(q), _ptr(k), _ptr(v), _ptr(k_pos), _ptr(q_pos), _ptr(rows), B, H, Hkv, D,
        k.stride(0) // (Hkv * D), n_slots,
        window or 0, scale, softcap or 0.0, _ptr(out), _ptr(scratch), SPLIT_SLOTS, parts, threads,
    )
    return out


def geglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up for a fused (..., 2F) gate|up projection -> (..., F), float32 or bfloat16."""
    F2 = gate_up.shape[-1]
    flat = gate_up.contiguous()
    out = torch.empty(*gate_up.shape[:-1], F2 // 2, dtype=flat.dtype)
    fn = kernels().geglu_bf16 if flat.dtype == torch.bfloat16 else kernels().geglu
    fn(_ptr(flat), _ptr(out), flat.numel() // F2, F2 // 2, torch.get_num_threads())
    return out
