"""The one table from checkpoint tensor names to gemmakit parameter names.

Our names follow the Hugging Face module tree (``layers.N.self_attn.q_proj.weight``). Patterns use ``{i}`` for
the layer index. A checkpoint tensor that matches no row is an error, and so is a parameter no tensor fills.
"""

from __future__ import annotations

import re

# GGUF (llama.cpp) name -> gemmakit name.
GGUF_TO_GEMMAKIT: dict[str, str] = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.post_attention_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
    "blk.{i}.post_ffw_norm.weight": "layers.{i}.post_feedforward_layernorm.weight",
}


def _compile(table: dict[str, str]) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for src, dst in table.items():
        pattern = re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)")
        rules.append((re.compile(pattern + "$"), dst))
    return rules


_GGUF_RULES = _compile(GGUF_TO_GEMMAKIT)


def gguf_to_gemmakit(name: str) -> str | None:
    """Our parameter name for a GGUF tensor name, or None if the table has no row for it."""
    for pattern, dst in _GGUF_RULES:
        m = pattern.match(name)
        if m:
            return dst.format(i=m.group("i")) if "i" in m.groupdict() else dst
    return None
