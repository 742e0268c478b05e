"""Model configuration: one dataclass for every Gemma text decoder (Gemma 1, 2, 3 and 4).

Field names follow the Hugging Face ``config.json`` keys. Generations differ only by these values (norm
placement, soft-caps, layer pattern, per-layer head sizes, PLE, KV sharing, MoE), never by separate model code.
:meth:`GemmaConfig.layer` resolves everything one decoder layer needs into a :class:`LayerSpec`.

Norm weights are always held as the final multiplier: llama.cpp GGUFs store them that way, Gemma 4 checkpoints
too; Gemma 1-3 HF checkpoints store ``w`` for a ``1 + w`` multiplier and are shifted at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import CorruptFileError, UnsupportedModelError

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class LayerSpec:
    """Everything that can differ between two decoder layers."""

    index: int
    sliding: bool
    head_dim: int
    num_key_value_heads: int
    intermediate_size: int
    # Keys double as values (Gemma 4 31B / 26B-A4B global layers): no v_proj.
    k_eq_v: bool
    # KV sharing (Gemma 4 E2B/E4B): this layer computes only queries and attends over the keys and values of
    # layer `kv_source`; None for a layer that computes its own.
    kv_source: int | None
    # This layer's keys/values are read by later shared layers.
    kv_store: bool


@dataclass
class GemmaConfig:
    """Hyper-parameters of a Gemma text decoder."""

    architecture: str  # gemma, gemma2, gemma3, gemma4
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # Each layer's attention kind, SLIDING or FULL.
    layer_types: list[str]
    # Tokens a sliding layer sees, the current one included (q - window < k <= q). None: no sliding layers.
    sliding_window: int | None
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    # RoPE base of full-attention layers, and of sliding layers.
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    # Linear position scaling on full-attention layers (Gemma 3 4B+ use 8); 1.0 means none.
    rope_scaling_factor: float = 1.0
    # Gemma 4 global layers rotate only this fraction of the head ("proportional" RoPE); 1.0 rotates all.
    global_partial_rotary_factor: float = 1.0
    # Attention scores are multiplied by query_pre_attn_scalar ** -0.5 (Gemma 4: no scaling, see below).
    query_pre_attn_scalar: float = 256.0
    attention_scale_one: bool = False
    # Gemma 2 caps attention logits and final logits with c * tanh(x / c); None disables.
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    # Gemma 2+ wrap attention and MLP in post-norms; Gemma 3+ normalize q and k per head; Gemma 4 also v.
    use_post_norms: bool = True
    use_qk_norm: bool = True
    use_v_norm: bool = False
    # Gemma 4 multiplies the residual stream by a learned scalar after every layer.
    use_layer_scalar: bool = False
    # Gemma 4 global layers: their own head size and KV-head count, and K = V.
    global_head_dim: int | None = None
    num_global_key_value_heads: int | None = None
    attention_k_eq_v: bool = False
    # Gemma 4 E-series: per-layer embeddings (PLE) of this width (0: none), KV sharing, double-wide MLP.
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    # Per-layer MLP widths when they differ (llama.cpp writes an array); overrides the double-wide rule.
    intermediate_sizes: list[int] | None = None
    # Gemma 4 26B-A4B: a dense MLP plus a mixture of experts in every layer.
    enable_moe_block: bool = False
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types must have one entry per layer")
        if any(t not in (SLIDING, FULL) for t in self.layer_types):
            raise ValueError(f"unknown layer type in {sorted(set(self.layer_types))}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("sliding layers need a sliding_window")
        sources = [self._kv_source(i) for i in range(self.num_hidden_layers)]
        self._layers = [self._build_layer(i, sources[i], i in sources) for i in range(self.num_hidden_layers)]
        for spec in self._layers:
            if self.num_attention_heads % spec.num_key_value_heads:
                raise ValueError("num_attention_heads must be a multiple of every layer's KV-head count")

    # -- per-layer resolution ----------------------------------------------------------------------------

    def _kv_source(self, i: int) -> int | None:
        """For a KV-shared layer, the last non-shared layer of the same attention type; else None."""
        first_shared = self.num_hidden_layers - self.num_kv_shared_layers
        if not self.num_kv_shared_layers or i < first_shared:
            return None
        same = [j for j in range(first_shared) if self.layer_types[j] == self.layer_types[i]]
        if not same:
            raise ValueError(f"shared layer {i} has no earlier {self.layer_types[i]} layer to read")
        return same[-1]

    def _build_layer(self, i: int, kv_source: int | None, kv_store: bool) -> LayerSpec:
        sliding = self.layer_types[i] == SLIDING
        head_dim = self.head_dim if sliding or not self.global_head_dim else self.global_head_dim
        k_eq_v = self.attention_k_eq_v and not sliding
        n_kv = self.num_key_value_heads
        if k_eq_v and self.num_global_key_value_heads:
            n_kv = self.num_global_key_value_heads
        if self.intermediate_sizes is not None:
            width = self.intermediate_sizes[i]
        else:
            width = self.intermediate_size * (2 if self.use_double_wide_mlp and kv_source is not None else 1)
        return LayerSpec(i, sliding, head_dim, n_kv, width, k_eq_v, kv_source, kv_store)

    def layer(self, i: int) -> LayerSpec:
        return self._layers[i]

    @property
    def layers(self) -> list[LayerSpec]:
        return self._layers

    @property
    def attention_scale(self) -> float:
        return 1.0 if self.attention_scale_one else self.query_pre_attn_scalar**-0.5

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING


def alternating_layer_types(n_layers: int, pattern: int) -> list[str]:
    """Layer i is full attention when (i + 1) % pattern == 0 (Gemma 2: pattern 2, Gemma 3: 6)."""
    return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]


# ------------------------------------------------------------------------------------------------------
# Hugging Face config.json
# ------------------------------------------------------------------------------------------------------

HF_TEXT_MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma4_text": "gemma4"}
HF_MULTIMODAL_MODEL_TYPES = {"gemma3": "gemma3", "gemma4": "gemma4", "gemma3n": None}


def text_config_of(cfg: dict[str, Any], where: str) -> tuple[str, dict[str, Any], bool]:
    """(architecture, text config dict, multimodal?) from a config.json dict."""
    model_type = cfg.get("model_type")
    if model_type in HF_TEXT_MODEL_TYPES:
        return HF_TEXT_MODEL_TYPES[model_type], cfg, False
    if model_type in HF_MULTIMODAL_MODEL_TYPES and HF_MULTIMODAL_MODEL_TYPES[model_type]:
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise CorruptFileError(f"{where}: multimodal config has no text_config")
        return HF_MULTIMODAL_MODEL_TYPES[model_type], text, True
    raise UnsupportedModelError(
        f"{where}: model_type {model_type!r} is not supported "
        f"(supported: {', '.join(sorted(HF_TEXT_MODEL_TYPES) + ['gemma3', 'gemma4'])})"
    )


def _rope_params(text: dict[str, Any], layer_type: str) -> dict[str, Any]:
    params = text.get("rope_parameters") or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        return params[layer_type]
    return params if "rope_theta" in params else {}


def config_from_hf(cfg: dict[str, Any], where: str = "config.json") -> GemmaConfig:
    """Build the configuration from a transformers ``config.json`` (text-only or multimodal)."""
    arch, t, _ = text_config_of(cfg, where)

    def need(key: str) -> Any:
        if key not in t:
            raise CorruptFileError(f"{where}: text config has no {key!r}")
        return t[key]

    n_layers = int(need("num_hidden_layers"))
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    head_dim = int(t.get("head_dim") or hidden // heads)
    window = t.get("sliding_window")
    common: dict[str, Any] = dict(
        architecture=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=int(t.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_position_embeddings=int(t.get("max_position_embeddings", 8192)),
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
        final_logit_softcapping=t.get("final_logit_softcapping"),
        bos_token_id=int(t.get("bos_token_id") if t.get("bos_token_id") is not None else 2),
        eos_token_id=_first_int(t.get("eos_token_id"), 1),
        pad_token_id=int(t.get("pad_token_id") if t.get("pad_token_id") is not None else 0),
    )
    full_rope, local_rope = _rope_params(t, FULL), _rope_params(t, SLIDING)
    if arch == "gemma":
        theta = float(full_rope.get("rope_theta", t.get("rope_theta", 10_000.0)))
        return GemmaConfig(
            **common, layer_types=[FULL] * n_layers, sliding_window=None, rope_theta=theta,
            rope_local_base_freq=theta, query_pre_attn_scalar=float(head_dim), use_post_norms=False,
            use_qk_norm=False,
        )
    layer_types = list(t.get("layer_types") or [])
    if arch == "gemma2":
        theta = float(full_rope.get("rope_theta", t.get("rope_theta", 10_000.0)))
        return GemmaConfig(
            **common, layer_types=layer_types or alternating_layer_types(n_layers, 2), sliding_window=window,
            rope_theta=theta, rope_local_base_freq=theta,
            query_pre_attn_scalar=float(t.get("query_pre_attn_scalar", 256)),
            attn_logit_softcapping=t.get("attn_logit_softcapping"), use_qk_norm=False,
        )
    if arch == "gemma3":
        factor = 1.0
        if full_rope.get("rope_type") == "linear":
            factor = float(full_rope.get("factor", 1.0))
        return GemmaConfig(
            **common, layer_types=layer_types or alternating_layer_types(n_layers, 6), sliding_window=window,
            rope_theta=float(full_rope.get("rope_theta", 1_000_000.0)),
            rope_local_base_freq=float(local_rope.get("rope_theta", t.get("rope_local_base_freq", 10_000.0))),
            rope_scaling_factor=factor, query_pre_attn_scalar=float(t.get("query_pre_attn_scalar", 256)),
            attn_logit_softcapping=t.get("attn_logit_softcapping"),
        )
    return _gemma4_from_hf(t, common, layer_types or alternating_layer_types(n_layers, 6), window, full_rope,
                           local_rope)


def _gemma4_from_hf(t: dict[str, Any], common: dict[str, Any], layer_types: list[str], window: Any,
                    full_rope: dict[str, Any], local_rope: dict[str, Any]) -> GemmaConfig:
    """The Gemma 4 part of :func:`config_from_hf`: per-layer head sizes, proportional RoPE, PLE, sharing, MoE."""
    return GemmaConfig(
        **common, layer_types=layer_types, sliding_window=window,
        rope_theta=float(full_rope.get("rope_theta", 1_000_000.0)),
        rope_local_base_freq=float(local_rope.get("rope_theta", 10_000.0)),
        rope_scaling_factor=float(full_rope.get("factor", 1.0)) if full_rope.get("rope_type") == "linear" else 1.0,
        global_partial_rotary_factor=float(full_rope.get("partial_rotary_factor", 1.0))
        if full_rope.get("rope_type") == "proportional" else 1.0,
        attention_scale_one=True, use_v_norm=True, use_layer_scalar=True,
        global_head_dim=_global_head_dim(t),
        num_global_key_value_heads=_global_kv_heads(t),
        attention_k_eq_v=bool(t.get("attention_k_eq_v", False)),
        hidden_size_per_layer_input=int(t.get("hidden_size_per_layer_input") or 0),
        vocab_size_per_layer_input=int(t.get("vocab_size_per_layer_input") or 0),
        num_kv_shared_layers=int(t.get("num_kv_shared_layers") or 0),
        use_double_wide_mlp=bool(t.get("use_double_wide_mlp", False)),
        enable_moe_block=bool(t.get("enable_moe_block", False)),
        num_experts=int(t.get("num_experts") or 0),
        top_k_experts=int(t.get("top_k_experts") or 0),
        moe_intermediate_size=int(t.get("moe_intermediate_size") or 0),
    )


def _first_int(value: Any, default: int) -> int:
    if isinstance(value, list):
        return int(value[0]) if value else default
    return int(value) if value is not None else default


def _global_head_dim(t: dict[str, Any]) -> int | None:
    if t.get("global_head_dim"):
        return int(t["global_head_dim"])
    per_layer = t.get("per_layer_config") or {}
    for override in per_layer.values():
        if isinstance(override, dict) and "head_dim" in override:
            return int(override["head_dim"])
    return 512


def _global_kv_heads(t: dict[str, Any]) -> int | None:
    if t.get("num_global_key_value_heads"):
        return int(t["num_global_key_value_heads"])
    per_layer = t.get("per_layer_config") or {}
    for override in per_layer.values():
        if isinstance(override, dict) and "num_key_value_heads" in override:
            return int(override["num_key_value_heads"])
    return None


# ------------------------------------------------------------------------------------------------------
# GGUF metadata (llama.cpp keys)
# ------------------------------------------------------------------------------------------------------

SUPPORTED_GGUF_ARCHES = ("gemma", "gemma2", "gemma3", "gemma4")


def _meta_int(meta: dict[str, Any], key: str, path: str, allow_array: bool = False) -> Any:
    if key not in meta:
        raise CorruptFileError(f"{path}: metadata key {key!r} is missing")
    value = meta[key]
    if hasattr(value, "__len__") and not isinstance(value, str):
        if not allow_array:
            raise UnsupportedModelError(f"{path}: per-layer values for {key!r} are not supported here")
        values = [int(v) for v in value]
        if not values or min(values) < 0 or max(values) > 1 << 24:
            raise CorruptFileError(f"{path}: metadata {key!r} holds out-of-range values")
        return values
    value = int(value)
    if value <= 0 or value > 1 << 24:
        raise CorruptFileError(f"{path}: metadata {key!r} = {value} is out of range")
    return value


def config_from_gguf(meta: dict[str, Any], path: str, tensors: dict[str, Any] | None = None,
                     rope_freqs: Any = None) -> GemmaConfig:
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
    kv_key = p + "attention.head_count_kv"
    n_kv_raw = _meta_int(meta, kv_key, path, allow_array=True) if kv_key in meta else n_heads
    ffn = _meta_int(meta, p + "feed_forward_length", path, allow_array=True)
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise CorruptFileError(f"{path}: metadata has no tokenizer.ggml.tokens")
    head_dim = _meta_int(meta, p + "attention.key_length", path) if p + "attention.key_length" in meta else hidden // n_heads
    softcap = meta.get(p + "final_logit_softcapping")
    common: dict[str, Any] = dict(
        architecture=arch,
        vocab_size=len(tokens),
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        max_position_embeddings=_meta_int(meta, p + "context_length", path),
        rms_norm_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-6)),
        final_logit_softcapping=float(softcap) if softcap else None,
        bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_id=int(meta.get("tokenizer.ggml.eos_token_id", 1)),
        pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)),
    )
    if arch != "gemma4":
        return _gemma123_from_gguf(meta, path, common, n_kv_raw, ffn, head_dim)
    return _gemma4_from_gguf(meta, path, common, n_kv_raw, ffn, tensors or {}, rope_freqs)


def _gemma123_from_gguf(meta: dict[str, Any], path: str, common: dict[str, Any], n_kv_raw: Any, ffn: Any,
                        head_dim: int) -> GemmaConfig:
    """Gemma 1, 2 and 3 from llama.cpp's keys, with the values llama.cpp hard-codes for each."""
    arch, p = common["architecture"], common["architecture"] + "."
    n_layers, hidden, n_heads = common["num_hidden_layers"], common["hidden_size"], common["num_attention_heads"]
    if isinstance(n_kv_raw, list) or isinstance(ffn, list):
        raise UnsupportedModelError(f"{path}: per-layer head counts or widths are not supported for {arch}")
    common = common | dict(intermediate_size=ffn, num_key_value_heads=n_kv_raw, head_dim=head_dim)
    window = int(meta[p + "attention.sliding_window"]) if p + "attention.sliding_window" in meta else None
    if arch == "gemma":
        return GemmaConfig(**common, layer_types=[FULL] * n_layers, sliding_window=None,
                           rope_theta=float(meta.get(p + "rope.freq_base", 10_000.0)),
                           rope_local_base_freq=float(meta.get(p + "rope.freq_base", 10_000.0)),
                           query_pre_attn_scalar=float(head_dim), use_post_norms=False, use_qk_norm=False)
    if arch == "gemma2":
        # llama.cpp: 1/sqrt(head_dim) except 27B (46 layers), which uses hidden / heads.
        q_scalar = hidden / n_heads if n_layers == 46 else head_dim
        theta = float(meta.get(p + "rope.freq_base", 10_000.0))
        return GemmaConfig(**common, layer_types=alternating_layer_types(n_layers, 2), sliding_window=window,
                           rope_theta=theta, rope_local_base_freq=theta, query_pre_attn_scalar=float(q_scalar),
                           attn_logit_softcapping=meta.get(p + "attn_logit_softcapping"), use_qk_norm=False)
    # gemma3: llama.cpp scales by 1/sqrt(head_dim) except on Gemma 3 27B (62 layers), which uses hidden / heads.
    q_scalar = hidden / n_heads if n_layers == 62 else head_dim
    factor = float(meta.get(p + "rope.scaling.factor", 1.0)) if meta.get(p + "rope.scaling.type") == "linear" else 1.0
    return GemmaConfig(**common, layer_types=alternating_layer_types(n_layers, 6), sliding_window=window,
                       rope_theta=float(meta.get(p + "rope.freq_base", 1_000_000.0)),
                       rope_local_base_freq=float(meta.get(p + "rope.freq_base_swa", 10_000.0)),
                       rope_scaling_factor=factor, query_pre_attn_scalar=float(q_scalar))


def _gemma4_from_gguf(meta: dict[str, Any], path: str, common: dict[str, Any], n_kv_raw: Any, ffn: Any,
                      tensors: dict[str, Any], rope_freqs: Any) -> GemmaConfig:
    p = "gemma4."
    n_layers = common["num_hidden_layers"]
    pattern = meta.get(p + "attention.sliding_window_pattern")
    if pattern is None or len(pattern) != n_layers:
        raise CorruptFileError(f"{path}: gemma4.attention.sliding_window_pattern must list every layer")
    layer_types = [SLIDING if bool(s) else FULL for s in pattern]
    n_kv = n_kv_raw if isinstance(n_kv_raw, list) else [n_kv_raw] * n_layers
    swa_kv = {n_kv[i] for i in range(n_layers) if layer_types[i] == SLIDING} or {n_kv[0]}
    full_kv = {n_kv[i] for i in range(n_layers) if layer_types[i] == FULL} or swa_kv
    global_head_dim = _meta_int(meta, p + "attention.key_length", path)
    swa_head_dim = _meta_int(meta, p + "attention.key_length_swa", path) if p + "attention.key_length_swa" in meta else global_head_dim
    widths = ffn if isinstance(ffn, list) else [ffn] * n_layers
    # "K = V" global attention shows as global layers that have attn_k but no attn_v.
    k_eq_v = any(
        layer_types[i] == FULL and f"blk.{i}.attn_k.weight" in tensors and f"blk.{i}.attn_v.weight" not in tensors
        for i in range(n_layers)
    )
    # Proportional RoPE: llama.cpp stores per-frequency divisors; 1.0 rotates, a huge value freezes a pair.
    fraction = 1.0
    if rope_freqs is not None:
        factors = [float(f) for f in rope_freqs]
        fraction = sum(1 for f in factors if f == 1.0) / max(len(factors), 1)
    expert_count = int(meta.get(p + "expert_count", 0) or 0)
    return GemmaConfig(
        **common,
        intermediate_size=widths[0],
        intermediate_sizes=widths,
        num_key_value_heads=next(iter(swa_kv)),
        head_dim=swa_head_dim,
        layer_types=layer_types,
        sliding_window=int(meta[p + "attention.sliding_window"]) if p + "attention.sliding_window" in meta else None,
        rope_theta=float(meta.get(p + "rope.freq_base", 1_000_000.0)),
        rope_local_base_freq=float(meta.get(p + "rope.freq_base_swa", 10_000.0)),
        global_partial_rotary_factor=fraction,
        attention_scale_one=True,
        use_v_norm=True,
        use_layer_scalar=True,
        global_head_dim=global_head_dim,
        num_global_key_value_heads=next(iter(full_kv)),  # the same set as swa_kv when no layer is global
        attention_k_eq_v=k_eq_v,
        hidden_size_per_layer_input=int(meta.get(p + "embedding_length_per_layer_input", 0) or 0),
        vocab_size_per_layer_input=common["vocab_size"],
        num_kv_shared_layers=int(meta.get(p + "attention.shared_kv_layers", 0) or 0),
        enable_moe_block=expert_count > 0,
        num_experts=expert_count,
        top_k_experts=int(meta.get(p + "expert_used_count", 0) or 0),
        moe_intermediate_size=int(meta.get(p + "expert_feed_forward_length", 0) or 0),
    )
