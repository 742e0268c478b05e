"""A model configuration as llama.cpp's GGUF hyper-parameter keys, checked by reading them back.

llama.cpp hard-codes some of what a Hugging Face config states (Gemma 3's local RoPE base, Gemma 2's query
scale except on 27B, ...). So after writing the keys, :func:`check_round_trip` reads them back the way gemmakit
reads any GGUF (which follows llama.cpp) and refuses a checkpoint whose file would describe another model,
rather than writing one that silently runs differently.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import FULL, GemmaConfig, config_from_gguf
from ..errors import UnsupportedModelError

# llama.cpp freezes a proportional-RoPE frequency pair with this divisor (rope_freqs).
FROZEN_PAIR = 1e30


def f32(x: float) -> float:
    """The value a float32 key holds."""
    return float(np.float32(x))


def architecture_keys(c: GemmaConfig) -> dict[str, Any]:
    """``{arch}.*`` key -> value for this configuration (ints are written as uint32, floats as float32)."""
    a = c.architecture + "."
    keys: dict[str, Any] = {
        a + "context_length": c.max_position_embeddings,
        a + "embedding_length": c.hidden_size,
        a + "block_count": c.num_hidden_layers,
        a + "attention.head_count": c.num_attention_heads,
        a + "attention.layer_norm_rms_epsilon": f32(c.rms_norm_eps),
        a + "rope.freq_base": f32(c.rope_theta),
    }
    if c.architecture == "gemma4":
        return keys | _gemma4_keys(c)
    keys |= {a + "feed_forward_length": c.intermediate_size, a + "attention.head_count_kv": c.num_key_value_heads,
             a + "attention.key_length": c.head_dim, a + "attention.value_length": c.head_dim}
    if c.sliding_window and c.architecture != "gemma":
        keys[a + "attention.sliding_window"] = c.sliding_window
    if c.attn_logit_softcapping:
        keys[a + "attn_logit_softcapping"] = f32(c.attn_logit_softcapping)
    if c.final_logit_softcapping:
        keys[a + "final_logit_softcapping"] = f32(c.final_logit_softcapping)
    if c.rope_scaling_factor != 1.0:
        keys[a + "rope.scaling.type"] = "linear"
        keys[a + "rope.scaling.factor"] = f32(c.rope_scaling_factor)
    return keys


def _gemma4_keys(c: GemmaConfig) -> dict[str, Any]:
    a = "gemma4."
    global_dim = c.global_head_dim or c.head_dim
    keys: dict[str, Any] = {
        a + "feed_forward_length": [spec.intermediate_size for spec in c.layers],
        a + "attention.head_count_kv": [spec.num_key_value_heads for spec in c.layers],
        a + "attention.key_length": global_dim,
        a + "attention.value_length": global_dim,
        a + "attention.key_length_swa": c.head_dim,
        a + "attention.value_length_swa": c.head_dim,
        # The global rotation spans the whole global head; rope_freqs freezes the pairs it does not rotate.
        a + "rope.dimension_count": global_dim,
        a + "rope.dimension_count_swa": c.head_dim,
        a + "rope.freq_base_swa": f32(c.rope_local_base_freq),
        a + "attention.sliding_window_pattern": [t != FULL for t in c.layer_types],
        a + "attention.shared_kv_layers": c.num_kv_shared_layers,
        a + "embedding_length_per_layer_input": c.hidden_size_per_layer_input,
    }
    if c.sliding_window:
        keys[a + "attention.sliding_window"] = c.sliding_window
    if c.final_logit_softcapping:
        keys[a + "final_logit_softcapping"] = f32(c.final_logit_softcapping)
    if c.enable_moe_block:
        keys |= {a + "expert_count": c.num_experts, a + "expert_used_count": c.top_k_experts,
                 a + "expert_feed_forward_length": c.moe_intermediate_size}
    return keys


def rope_freqs(c: GemmaConfig) -> list[float] | None:
    """Gemma 4's proportional RoPE as llama.cpp stores it: divisor 1 for each rotated frequency pair of a global
    head, :data:`FROZEN_PAIR` for the rest; None when every pair rotates."""
    if c.architecture != "gemma4" or c.global_partial_rotary_factor >= 1.0:
        return None
    pairs = (c.global_head_dim or c.head_dim) // 2
    rotated = int(c.global_partial_rotary_factor * pairs)
    return [1.0] * rotated + [FROZEN_PAIR] * (pairs - rotated)


# What the file must reproduce exactly; the per-layer table (LayerSpec) covers head sizes, widths, sharing, K=V.
_COMPARED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "layer_types", "sliding_window",
             "max_position_embeddings", "rope_theta", "rope_local_base_freq", "rope_scaling_factor",
             "global_partial_rotary_factor", "attention_scale", "attn_logit_softcapping", "final_logit_softcapping",
             "use_post_norms", "use_qk_norm", "use_v_norm", "use_layer_scalar", "hidden_size_per_layer_input",
             "num_kv_shared_layers", "enable_moe_block", "num_experts", "top_k_experts", "moe_intermediate_size",
             "layers", "rms_norm_eps")


def check_round_trip(config: GemmaConfig, keys: dict[str, Any], tensor_names: set[str], where: str) -> None:
    """Read ``keys`` back as a GGUF's metadata and require the configuration it describes to be ``config``.

    Raises:
        UnsupportedModelError: naming the first setting llama.cpp's keys cannot express.
    """
    freqs = rope_freqs(config)
    back = config_from_gguf(keys, where, {name: None for name in tensor_names}, freqs)
    for name in _COMPARED:
        want, got = getattr(config, name), getattr(back, name)
        if isinstance(want, float) and got is not None:
            want, got = f32(want), f32(got)
        if want != got:
            raise UnsupportedModelError(
                f"{where}: {name} = {_short(want)} cannot be written in llama.cpp's {config.architecture} GGUF keys "
                f"(a GGUF would describe {_short(got)}, and llama.cpp would run a different model)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
