"""The Gemma text decoder as pure tensor math.

No tokenizer, sampling or file I/O here. Shapes: B batch rows, T new tokens, K attended keys, H query heads,
Hkv key/value heads, D head_dim, E hidden size.

References: transformers ``models/gemma3/modeling_gemma3.py``, llama.cpp ``src/models/gemma3.cpp`` and
../shared/docs/gemma-architectures.md. Norm weights are the final multipliers (see config.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GemmaConfig
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gemma normalizes and scales in float32, then casts back ((x * w).to(dtype), not x.to(dtype) * w).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


def rope_inv_freq(head_dim: int, theta: float, scaling_factor: float = 1.0) -> torch.Tensor:
    """(D/2,) inverse frequencies; linear scaling divides them by the factor."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents) / scaling_factor


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, T, 1, D) for rotate-half RoPE at the given absolute positions (B, T)."""
    freqs = positions.float().unsqueeze(-1) * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().unsqueeze(2), emb.sin().unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) RoPE on x (B, T, heads, D): pairs are (i, i + D/2)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (B, 1, T, K) mask: key visible iff it holds a token at or before the query and, on sliding
    layers, within the window (q - window < k <= q).

    Padding queries (position -1) see only empty or padding slots, which keeps their rows finite.
    """
    q = q_pos.unsqueeze(-1)  # (B, T, 1)
    k = k_pos.unsqueeze(1)  # (B, 1, K)
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible &= k > q - window
    visible |= (q < 0) & (k < 0)
    return visible.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int) -> None:
        super().__init__()
        E, D = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        self.q_proj = nn.Linear(E, self.n_heads * D, bias=False)
        self.k_proj = nn.Linear(E, self.n_kv * D, bias=False)
        self.v_proj = nn.Linear(E, self.n_kv * D, bias=False)
        self.o_proj = nn.Linear(self.n_heads * D, E, bias=False)
        self.q_norm = RMSNorm(D, config.rms_norm_eps) if config.use_qk_norm else None
        self.k_norm = RMSNorm(D, config.rms_norm_eps) if config.use_qk_norm else None
        self.scale = config.attention_scale
        self.softcap = config.attn_logit_softcapping
        self.window = config.sliding_window if config.is_sliding(layer) else None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, E)
        positions: torch.Tensor,  # (B, T)
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: "KVCache | None",
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v, k_pos = cache.layers[layer].update(k, v, positions)  # (B, K, Hkv, D), (B, K)
        else:
            k_pos = positions
        mask = attention_mask(positions, k_pos, self.window)
        out = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        groups = self.n_heads // self.n_kv
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=groups > 1)
        # Soft-capped scores (Gemma 2) cannot go through SDPA: write the attention out.
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GeGLU with the tanh approximation of GELU (HF "gelu_pytorch_tanh").
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int) -> None:
        super().__init__()
        E, eps = config.hidden_size, config.rms_norm_eps
        self.layer = layer
        self.sliding = config.is_sliding(layer)
        self.input_layernorm = RMSNorm(E, eps)
        self.self_attn = Attention(config, layer)
        self.pre_feedforward_layernorm = RMSNorm(E, eps)
        self.mlp = MLP(E, config.intermediate_size)
        self.post_attention_layernorm = RMSNorm(E, eps) if config.use_post_norms else None
        self.post_feedforward_layernorm = RMSNorm(E, eps) if config.use_post_norms else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope, cache: "KVCache | None") -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), positions, rope, cache, self.layer)
        if self.post_attention_layernorm is not None:
            h = self.post_attention_layernorm(h)
        x = x + h
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.post_feedforward_layernorm is not None:
            h = self.post_feedforward_layernorm(h)
        return x + h


class Gemma(nn.Module):
    """Gemma text decoder with a tied output head.

    ``forward(tokens, positions, cache)`` returns the final hidden states; :meth:`logits` maps hidden states
    to vocabulary logits (only for the positions the caller asks for, which saves the 262k-wide head on
    every prompt token that is not sampled).
    """

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)build the RoPE frequency tables; a model built on the meta device calls this after loading."""
        c = self.config
        local = rope_inv_freq(c.head_dim, c.rope_local_base_freq)
        full = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_factor)
        self.register_buffer("inv_freq_local", local, persistent=False)
        self.register_buffer("inv_freq_global", full, persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) int64
        positions: torch.Tensor,  # (B, T) int64 absolute positions, -1 for padding
        cache: KVCache | None = None,
    ) -> torch.Tensor:  # (B, T, E)
        x = self.embed_tokens(tokens)
        # The sqrt(E) scale is rounded to the activation dtype first, as the reference does.
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        rope_local = rope_cos_sin(positions, self.inv_freq_local)
        rope_global = rope_cos_sin(positions, self.inv_freq_global)
        for layer in self.layers:
            x = layer(x, positions, rope_local if layer.sliding else rope_global, cache)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., E) hidden states -> (..., vocab) float32 logits, soft-capped when the model says so."""
        logits = F.linear(hidden, self.embed_tokens.weight).float()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
