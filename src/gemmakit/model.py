"""The Gemma text decoder (Gemma 1, 2, 3 and 4) as pure tensor math.

No tokenizer, sampling or file I/O here. Shapes: B batch rows, T new tokens, K attended keys, H query heads,
Hkv key/value heads, D head_dim, E hidden size, L layers, P per-layer-embedding width.

References: transformers ``models/gemma{,2,3,4}/modeling_*.py``, llama.cpp ``src/models/gemma*.cpp`` and
../shared/docs/gemma-architectures.md. Norm weights are the final multipliers (see config.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GemmaConfig, LayerSpec
from .kv_cache import KVCache
from .kernels import fused
from .quant.linear import fast_rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_weight: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Gemma normalizes and scales in float32, then casts back ((x * w).to(dtype), not x.to(dtype) * w).
        if fused.cpu_kernels_ok(x):
            return fast_rms_norm(x, self.weight, self.eps)
        weight = self.weight.float() if self.weight is not None else None
        return F.rms_norm(x.float(), (x.shape[-1],), weight, self.eps).type_as(x)


def rope_inv_freq(head_dim: int, theta: float, scaling_factor: float = 1.0, rotary_fraction: float = 1.0) -> torch.Tensor:
    """(D/2,) inverse frequencies.

    Linear scaling divides them by the factor. A rotary fraction below 1 is Gemma 4's "proportional" RoPE: only
    the first fraction * D / 2 frequencies rotate, still with exponents over the full head_dim; the rest are 0
    (cos 1, sin 0: those dimensions pass through).
    """
    n_rot = int(rotary_fraction * head_dim // 2)
    # Always real CPU tensors (also while the model is built on the meta device).
    exponents = torch.arange(0, 2 * n_rot, 2, dtype=torch.int64, device="cpu").float() / head_dim
    rotated = 1.0 / (theta**exponents) / scaling_factor
    return torch.cat([rotated, torch.zeros(head_dim // 2 - n_rot, device="cpu")])


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of shape (B, T, 1, D) for rotate-half RoPE at absolute positions (B, T).

    The sin table carries the rotation's sign (-sin on the first half), so applying RoPE needs only a swap of
    the two halves: x * cos + swap(x) * signed_sin.
    """
    freqs = positions.float().unsqueeze(-1) * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    sin = freqs.sin()
    return emb.cos().unsqueeze(2), torch.cat([-sin, sin], dim=-1).unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NeoX) RoPE on x (B, T, heads, D): pairs are (i, i + D/2)."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # (x2, x1)
    return x * cos.to(x.dtype) + swapped * signed_sin.to(x.dtype)


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


KV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # keys, values (B, K, Hkv, D) and their positions (B, K)


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, spec: LayerSpec) -> None:
        super().__init__()
        E, D, eps = config.hidden_size, spec.head_dim, config.rms_norm_eps
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, spec.num_key_value_heads, D
        self.eps = eps
        self.layer = spec.index
        self.shared = spec.kv_source is not None
        self.k_eq_v = spec.k_eq_v
        self.q_proj = nn.Linear(E, self.n_heads * D, bias=False)
        self.o_proj = nn.Linear(self.n_heads * D, E, bias=False)
        # Set by the loader when q, k and v can run as one matmul (quantized weights); None otherwise.
        self.qkv_proj: nn.Module | None = None
        self.qkv_sizes: list[int] = []  # output widths of q, k, v inside qkv_proj
        self.q_norm = RMSNorm(D, eps) if config.use_qk_norm else None
        if not self.shared:
            self.k_proj = nn.Linear(E, self.n_kv * D, bias=False)
            self.v_proj = None if spec.k_eq_v else nn.Linear(E, self.n_kv * D, bias=False)
            self.k_norm = RMSNorm(D, eps) if config.use_qk_norm else None
            self.v_norm = RMSNorm(D, eps, with_weight=False) if config.use_v_norm else None
        self.scale = config.attention_scale
        self.softcap = config.attn_logit_softcapping
        self.window = config.sliding_window if spec.sliding else None

    def forward(
        self,
        x: torch.Tensor,  # (B, T, E)
        positions: torch.Tensor,  # (B, T)
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None,
        shared_kv: KV | None,
        masks: dict,
    ) -> tuple[torch.Tensor, KV]:
        B, T, _ = x.shape
        if cache is not None and fused.fused_decode_ok(x):
            return self._decode_fused(x, positions, rope, cache, shared_kv)
        k_new = v_new = None
        if self.qkv_proj is not None:
            q_flat, k_new, v_new = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q_flat = self.q_proj(x)
        q = q_flat.view(B, T, self.n_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = apply_rope(q, *rope)
        if self.shared:
            kv = shared_kv  # another layer's keys and values, already cached and positioned
        else:
            kv = self._own_kv(x, positions, rope, cache, k_new, v_new)
        k, v, k_pos = kv
        if cache is not None and cache.rows is not None:  # ragged: each token reads its own sequence's row
            k, v, k_pos = k[cache.rows], v[cache.rows], k_pos[cache.rows]
        qh = q.transpose(1, 2)  # (B, H, T, D)
        if masks.get("causal") and self.softcap is None:
            # Fresh, unpadded chunk that fits every window: keys are exactly the chunk's, in order, and plain
            # causal attention is the mask (SDPA's causal path is much faster than an explicit mask on CPU).
            out = F.scaled_dot_product_attention(qh, k[:, :T].transpose(1, 2), v[:, :T].transpose(1, 2),
                                                 is_causal=True, scale=self.scale,
                                                 enable_gqa=self.n_heads != self.n_kv)
        else:
            # Layers of one kind see the same key positions: build each mask once per forward.
            key = (self.window, k_pos.data_ptr(), tuple(k_pos.shape), k_pos.stride())
            mask = masks.get(key)
            if mask is None:
                mask = masks[key] = attention_mask(positions, k_pos, self.window)
            out = self._attend(qh, k.transpose(1, 2), v.transpose(1, 2), mask)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)), kv

    def _decode_fused(self, x: torch.Tensor, positions: torch.Tensor, rope, cache: KVCache,
                      shared_kv: KV | None) -> tuple[torch.Tensor, KV]:
        """One token per row through the fused C kernels (kernels/fused.py): the same math as the path above."""
        B = x.shape[0]
        own = None if self.shared else cache.layers[self.layer]
        k_norm = getattr(self, "k_norm", None)
        if self.shared:
            proj = self.q_proj(x)
        elif self.qkv_proj is not None:
            proj = self.qkv_proj(x)
        else:  # unfused float weights: the same q|k|v layout from three matmuls
            proj = torch.cat([self.q_proj(x), self.k_proj(x)] + ([self.v_proj(x)] if self.v_proj is not None else []), -1)
        q = fused.attn_prep(
            proj, self.n_heads, self.n_kv, self.head_dim, self.k_eq_v,
            self.q_norm.weight if self.q_norm is not None else None, k_norm.weight if k_norm is not None else None,
            self.q_norm is not None, getattr(self, "v_norm", None) is not None,
            self.eps, rope,
            own.k if own else None, own.v if own else None, own.slots.index if own else None, cache.rows,
        )
        kv = own.visible(positions) if own else shared_kv
        k, v, k_pos = kv
        # One token per row always attends over views of a cache (its own layer's, or the source layer's).
        assert fused.attends_in_place(k, k_pos), "decode keys must be views into a KV cache"
        out = fused.attend(q, k, v, k_pos, positions, self.window, self.scale, self.softcap, cache.rows)
        return self.o_proj(out.view(B, 1, -1)), kv

    def _own_kv(self, x: torch.Tensor, positions: torch.Tensor, rope, cache: KVCache | None,
                k_new: torch.Tensor | None, v_new: torch.Tensor | None) -> KV:
        B, T, _ = x.shape
        k = (k_new if k_new is not None else self.k_proj(x)).view(B, T, self.n_kv, self.head_dim)
        # K = V layers use the raw key projection as values (normalized separately, without RoPE).
        if self.k_eq_v:
            v = k
        else:
            v = (v_new if v_new is not None else self.v_proj(x)).view(B, T, self.n_kv, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.v_norm is not None:
            v = self.v_norm(v)
        k = apply_rope(k, *rope)
        if cache is not None:
            return cache.layers[self.layer].update(k, v, positions)
        return k, v, positions

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        groups = self.n_heads // self.n_kv
        if q.shape[2] == 1 and self.softcap is None:
            return self._attend_one(q, k, v, mask, groups)
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=groups > 1)
        # Soft-capped scores (Gemma 2) cannot go through SDPA: write the attention out.
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


    def _attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, groups: int):
        """Decode (one query per row) written out: SDPA's CPU kernel costs ~100 us of setup per call here."""
        B, H, _, D = q.shape
        qg = q.reshape(B, self.n_kv, groups, D)  # query heads grouped by the KV head they read
        scores = (qg @ k.transpose(-1, -2)).float() * self.scale  # (B, Hkv, G, K)
        scores = scores.masked_fill(~mask.reshape(B, 1, 1, -1), float("-inf"))
        out = torch.softmax(scores, dim=-1).to(v.dtype) @ v  # (B, Hkv, G, D)
        return out.reshape(B, H, 1, D)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        # Set by the loader when gate and up can run as one matmul (quantized weights); None otherwise.
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None and fused.bf16_prompt(self.gate_up_proj, x):
            # bf16 prompt matmuls: gate|up, GeGLU and down in bfloat16 end to end (the values are the same as
            # widening to float32 in between and rounding back, without the 2x larger copies).
            return self.down_proj(fused.geglu(self.gate_up_proj(x.to(torch.bfloat16)))).to(x.dtype)
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x)
            if fused.cpu_kernels_ok(gate_up):
                return self.down_proj(fused.geglu(gate_up))
            gate, up = gate_up.chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        # GeGLU with the tanh approximation of GELU (HF "gelu_pytorch_tanh").
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Router(nn.Module):
    """Gemma 4 MoE router: weightless RMSNorm, learned per-channel scale, softmax over experts, top-k."""

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        E = config.hidden_size
        self.top_k = config.top_k_experts
        self.norm = RMSNorm(E, config.rms_norm_eps, with_weight=False)
        self.proj = nn.Linear(E, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(E))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))
        self.root = E**-0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (N, E) -> (N, k) weights, ids
        probs = torch.softmax(self.proj(self.norm(x) * self.scale * self.root), dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids


class Experts(nn.Module):
    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        n, E, F_ = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(n, 2 * F_, E))  # gate rows, then up rows
        self.down_proj = nn.Parameter(torch.empty(n, E, F_))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                one_token_rows: bool = False) -> torch.Tensor:
        """x (N, E) the tokens, weights and ids (N, k) their experts -> (N, E). Each expert runs once on all of
        its tokens. ``one_token_rows``: the tokens are the rows of a decode step (quantized experts use it to keep
        each row's arithmetic independent of the others)."""
        out = torch.zeros_like(x)  # (N, E)
        for expert in torch.unique(ids).tolist():
            token, slot = torch.where(ids == expert)
            gate, up = F.linear(x[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[expert])
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, spec: LayerSpec) -> None:
        super().__init__()
        E, eps = config.hidden_size, config.rms_norm_eps
        self.spec = spec
        self.input_layernorm = RMSNorm(E, eps)
        self.self_attn = Attention(config, spec)
        self.pre_feedforward_layernorm = RMSNorm(E, eps)
        self.mlp = MLP(E, spec.intermediate_size)
        self.post_attention_layernorm = RMSNorm(E, eps) if config.use_post_norms else None
        self.post_feedforward_layernorm = RMSNorm(E, eps) if config.use_post_norms else None
        self.moe = config.enable_moe_block
        if self.moe:
            self.router = Router(config)
            self.experts = Experts(config)
            self.pre_feedforward_layernorm_2 = RMSNorm(E, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(E, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(E, eps)
        self.ple = config.hidden_size_per_layer_input > 0
        if self.ple:
            P = config.hidden_size_per_layer_input
            self.per_layer_input_gate = nn.Linear(E, P, bias=False)
            self.per_layer_projection = nn.Linear(P, E, bias=False)
            self.post_per_layer_input_norm = RMSNorm(E, eps)
        if config.use_layer_scalar:
            self.layer_scalar = nn.Parameter(torch.ones(1))
        else:
            self.layer_scalar = None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope,
        cache: KVCache | None,
        shared_kv: KV | None,
        per_layer_input: torch.Tensor | None,  # (B, T, P)
        masks: dict,
    ) -> tuple[torch.Tensor, KV]:
        h, kv = self.self_attn(self.input_layernorm(x), positions, rope, cache, shared_kv, masks)
        if self.post_attention_layernorm is not None:
            h = self.post_attention_layernorm(h)
        x = x + h
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:
            h = self.post_feedforward_layernorm_1(h) + self._experts(x)
        if self.post_feedforward_layernorm is not None:
            h = self.post_feedforward_layernorm(h)
        x = x + h
        if self.ple:
            gate = self.per_layer_input_gate(x)
            if fused.cpu_kernels_ok(gate) and per_layer_input.dtype == torch.float32:
                g = fused.gelu_mul(gate, per_layer_input)  # the C layer loop's arithmetic (bitwise the same)
            else:
                g = F.gelu(gate, approximate="tanh") * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        if self.layer_scalar is not None:
            x = x * self.layer_scalar  # scales the whole residual stream
        return x, kv

    def _experts(self, residual: torch.Tensor) -> torch.Tensor:
        # The router reads the un-normalized residual; the experts read their own pre-norm of it.
        flat = residual.reshape(-1, residual.shape[-1])
        weights, ids = self.router(flat)
        out = self.experts(self.pre_feedforward_layernorm_2(flat), weights, ids, residual.shape[-2] == 1)
        return self.post_feedforward_layernorm_2(out.reshape(residual.shape))


def _embedding_dtype(embedding: nn.Module) -> torch.dtype:
    """A quantized table computes in float32 (QuantEmbedding.compute_dtype); a plain one in its weight dtype."""
    return getattr(embedding, "compute_dtype", None) or embedding.weight.dtype


class Gemma(nn.Module):
    """Gemma text decoder with a tied output head.

    ``forward(tokens, positions, cache)`` returns the final hidden states; :meth:`logits` maps hidden states
    to vocabulary logits (only for the positions the caller asks for, which saves the 262k-wide head on
    every prompt token that is not sampled).
    """

    def __init__(self, config: GemmaConfig) -> None:
        super().__init__()
        self.config = config
        E = config.hidden_size
        # _weight skips the random init (on the meta device, init would import torch._dynamo: ~1.5 s).
        self.embed_tokens = nn.Embedding(config.vocab_size, E, _weight=torch.empty(config.vocab_size, E))
        self.layers = nn.ModuleList(DecoderLayer(config, spec) for spec in config.layers)
        self.norm = RMSNorm(E, config.rms_norm_eps)
        # How decode steps run (the C layer loop, C pieces per layer, PyTorch), chosen by the loader once the
        # weights are in place (kernels/fused.choose_decode_path); None until then.
        self.decode_path: str | None = None
        if config.hidden_size_per_layer_input:
            L, P = config.num_hidden_layers, config.hidden_size_per_layer_input
            self.embed_tokens_per_layer = nn.Embedding(
                config.vocab_size_per_layer_input, L * P, _weight=torch.empty(config.vocab_size_per_layer_input, L * P)
            )
            self.per_layer_model_projection = nn.Linear(E, L * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, config.rms_norm_eps)
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)build the RoPE frequency tables; a model built on the meta device calls this after loading."""
        c = self.config
        local = rope_inv_freq(c.head_dim, c.rope_local_base_freq)
        full = rope_inv_freq(c.global_head_dim or c.head_dim, c.rope_theta, c.rope_scaling_factor,
                             c.global_partial_rotary_factor)
        self.register_buffer("inv_freq_local", local, persistent=False)
        self.register_buffer("inv_freq_global", full, persistent=False)

    @property
    def activation_dtype(self) -> torch.dtype:
        """dtype of the hidden states (and so of the KV cache)."""
        return _embedding_dtype(self.embed_tokens)

    def _scaled(self, embedding: nn.Module, tokens: torch.Tensor, scale: float) -> torch.Tensor:
        x = embedding(tokens)
        # The scale is rounded to the weight dtype first, as the reference does (sqrt(3072) -> 55.5 in bf16).
        return x * torch.tensor(scale, dtype=_embedding_dtype(embedding)).to(x.dtype)

    def per_layer_inputs(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gemma 4 PLE: (token part + context part) / sqrt(2), shape (B, T, L, P)."""
        c = self.config
        L, P = c.num_hidden_layers, c.hidden_size_per_layer_input
        # Ids outside the PLE table (multimodal placeholders) read the pad row.
        ple_ids = torch.where(tokens < c.vocab_size_per_layer_input, tokens, torch.zeros_like(tokens))
        token_part = self._scaled(self.embed_tokens_per_layer, ple_ids, P**0.5).view(*tokens.shape, L, P)
        context = self.per_layer_model_projection(x) * c.hidden_size**-0.5
        context = self.per_layer_projection_norm(context.view(*tokens.shape, L, P))
        return (context + token_part) * 2**-0.5

    def forward(
        self,
        tokens: torch.Tensor,  # (B, T) int64
        positions: torch.Tensor,  # (B, T) int64 absolute positions, -1 for padding
        cache: KVCache | None = None,
        rows: torch.Tensor | None = None,  # (B,) int64: a ragged step (T = 1), token b in cache row rows[b]
    ) -> torch.Tensor:  # (B, T, E)
        """Hidden states after the final norm. Batch row b holds T tokens of the sequence in cache row b; or,
        with ``rows``, one token of the sequence in cache row ``rows[b]``, so one forward can carry several
        sequences' prompt tokens and decode tokens together (see KVCache.begin)."""
        if rows is not None and (cache is None or positions.shape[1] != 1):
            raise ValueError("a ragged forward (rows) takes one token per batch row and a cache")
        x = self._scaled(self.embed_tokens, tokens, self.config.hidden_size**0.5)
        ple = self.per_layer_inputs(tokens, x) if self.config.hidden_size_per_layer_input else None
        rope_local = rope_cos_sin(positions, self.inv_freq_local)
        rope_global = rope_cos_sin(positions, self.inv_freq_global)
        masks: dict = {}
        fresh = cache.begin(positions, rows) if cache is not None else True  # no earlier tokens to attend to
        T = positions.shape[1]
        window = self.config.sliding_window
        if fresh and T > 1 and (window is None or T <= window) and positions.shape[0] == 1 and bool(
            (positions[0] == torch.arange(T)).all()
        ):
            masks["causal"] = True
        if cache is not None and T == 1 and fused.decode_layers(self, x, positions, rope_local, rope_global, cache,
                                                                ple):
            return self.norm(x)  # every layer ran in one C call
        stored: dict[int, KV] = {}  # layer index -> keys/values that later shared layers read
        for i, layer in enumerate(self.layers):
            spec = layer.spec
            shared = stored[spec.kv_source] if spec.kv_source is not None else None
            x, kv = layer(x, positions, rope_local if spec.sliding else rope_global, cache, shared,
                          ple[:, :, i] if ple is not None else None, masks)
            if spec.kv_store:
                stored[i] = kv
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., E) hidden states -> (..., vocab) float32 logits, soft-capped when the model says so."""
        emb = self.embed_tokens
        # A quantized table multiplies from its compact form (QuantEmbedding.project).
        logits = (emb.project(hidden) if hasattr(emb, "project") else F.linear(hidden, emb.weight)).float()
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
