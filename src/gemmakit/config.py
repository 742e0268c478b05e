"""Model configuration: one dataclass for every Gemma text decoder, built from GGUF metadata.

Field names follow the Hugging Face ``config.json`` keys so that HF configs map onto it directly. Generations
differ only by these values (norm placement, soft-caps, layer pattern), never by separate model code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import CorruptFileError, UnsupportedModelError

SLIDING = "sliding_attention"
FULL = "full_attention"

SUPPORTED_GGUF_ARCHES = ("gemma3",)


@dataclass
class GemmaConfig:
    """Hyper-parameters of a Gemma text decoder.

    Norm weights are held as the final multiplier (llama.cpp stores them that way; HF Gemma 1-3 checkpoints
    store ``w`` for a ``1 + w`` multiplier and are shifted at load).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # Each layer's attention kind, SLIDING or FULL.
    layer_types: list[str]
    # Tokens a sliding layer sees, the current one included (HF semantics: q - window < k <= q).
    sliding_window: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    # RoPE base of full-attention layers, and of sliding layers.
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    # Linear position scaling on full-attention layers (Gemma 3 4B+ use 8); 1.0 means none.
    rope_scaling_factor: float = 1.0
    # Attention scores are multiplied by query_pre_attn_scalar ** -0.5.
    query_pre_attn_scalar: float = 256.0
    # Gemma 2 caps attention logits and final logits with c * tanh(x / c); None disables.
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Gemma 2+ wrap attention and MLP in post-norms; Gemma 3+ also normalize q and k per head.
    use_post_norms: bool = True
    use_qk_norm: bool = True
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types must have one entry per layer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def attention_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING


def gemma3_layer_types(n_layers: int, pattern: int = 6) -> list[str]:
    """Gemma 3's 5:1 pattern: layer i is full attention when (i + 1) % 6 == 0."""
    return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]


def _meta_int(meta: dict[str, Any], key: str, path: str) -> int:
    if key not in meta:
        raise CorruptFileError(f"{path}: metadata key {key!r} is missing")
    value = meta[key]
    if hasattr(value, "__len__"):
        raise UnsupportedModelError(f"{path}: per-layer values for {key!r} are not supported for this architecture")
    value = int(value)
    if value <= 0 or value > 1 << 24:
        raise CorruptFileError(f"{path}: metadata {key!r} = {value} is out of range")
    return value


def config_from_gguf(meta: dict[str, Any], path: str) -> GemmaConfig:
    """Build the configuration from GGUF metadata (llama.cpp keys).

    Raises:
        UnsupportedModelError: the architecture is not one gemmakit runs.
        CorruptFileError: a required key is missing or holds an impossible value.
    """
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHES:
        raise UnsupportedModelError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_GGUF_ARCHES)})"
        )
    p = arch + "."
    n_layers = _meta_int(meta, p + "block_count", path)
    hidden = _meta_int(meta, p + "embedding_length", path)
    n_heads = _meta_int(meta, p + "attention.head_count", path)
    n_kv = _meta_int(meta, p + "attention.head_count_kv", path) if p + "attention.head_count_kv" in meta else n_heads
    head_dim = _meta_int(meta, p + "attention.key_length", path) if p + "attention.key_length" in meta else hidden // n_heads
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise CorruptFileError(f"{path}: metadata has no tokenizer.ggml.tokens")
    # llama.cpp scales by 1/sqrt(head_dim) except on Gemma 3 27B (62 layers), which uses hidden / heads.
    q_scalar = hidden / n_heads if n_layers == 62 else head_dim
    scaling = meta.get(p + "rope.scaling.type")
    factor = float(meta.get(p + "rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
    softcap = meta.get(p + "final_logit_softcapping")
    return GemmaConfig(
        architecture=arch,
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=_meta_int(meta, p + "feed_forward_length", path),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        layer_types=gemma3_layer_types(n_layers),
        sliding_window=_meta_int(meta, p + "attention.sliding_window", path),
        max_position_embeddings=_meta_int(meta, p + "context_length", path),
        rms_norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta.get(p + "rope.freq_base", 1_000_000.0)),
        rope_local_base_freq=10_000.0,
        rope_scaling_factor=factor,
        query_pre_attn_scalar=float(q_scalar),
        final_logit_softcapping=float(softcap) if softcap else None,
        bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_id=int(meta.get("tokenizer.ggml.eos_token_id", 1)),
        pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)),
    )


def embed_scale(hidden_size: int) -> float:
    """sqrt(hidden): Gemma multiplies token embeddings by it (cast to the activation dtype by the model)."""
    return math.sqrt(hidden_size)
