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
    # Gemma 4 (llama.cpp layout; norms stored as-is)
    "per_layer_token_embd.weight": "embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "per_layer_projection_norm.weight",
    "blk.{i}.layer_output_scale.weight": "layers.{i}.layer_scalar",
    "blk.{i}.inp_gate.weight": "layers.{i}.per_layer_input_gate.weight",
    "blk.{i}.proj.weight": "layers.{i}.per_layer_projection.weight",
    "blk.{i}.post_norm.weight": "layers.{i}.post_per_layer_input_norm.weight",
    "blk.{i}.ffn_gate_inp.weight": "layers.{i}.router.proj.weight",
    "blk.{i}.ffn_gate_inp.scale": "layers.{i}.router.scale",
    "blk.{i}.ffn_down_exps.scale": "layers.{i}.router.per_expert_scale",
    "blk.{i}.ffn_gate_up_exps.weight": "layers.{i}.experts.gate_up_proj",
    # Older/other converters write the experts' gate and up halves as two tensors; they fill one parameter.
    "blk.{i}.ffn_gate_exps.weight": "layers.{i}.experts.gate_up_proj[0:2]",
    "blk.{i}.ffn_up_exps.weight": "layers.{i}.experts.gate_up_proj[1:2]",
    "blk.{i}.ffn_down_exps.weight": "layers.{i}.experts.down_proj",
    "blk.{i}.pre_ffw_norm_2.weight": "layers.{i}.pre_feedforward_layernorm_2.weight",
    "blk.{i}.post_ffw_norm_1.weight": "layers.{i}.post_feedforward_layernorm_1.weight",
    "blk.{i}.post_ffw_norm_2.weight": "layers.{i}.post_feedforward_layernorm_2.weight",
}
# Tensors that configure the model rather than fill a parameter.
GGUF_CONFIG_TENSORS = ("rope_freqs.weight",)


_PART = re.compile(r"^(?P<base>.+)\[(?P<k>\d+):(?P<n>\d+)\]$")


def split_part(ours: str) -> tuple[str, int, int] | None:
    """``"x.gate_up_proj[1:2]"`` -> ("x.gate_up_proj", 1, 2): part k of n stacked along dim 1; None otherwise."""
    m = _PART.match(ours)
    return (m.group("base"), int(m.group("k")), int(m.group("n"))) if m else None


def _compile(table: dict[str, str]) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for src, dst in table.items():
        pattern = re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)")
        rules.append((re.compile(pattern + "$"), dst))
    return rules


def _apply(rules: list[tuple[re.Pattern[str], str]], name: str) -> str | None:
    for pattern, dst in rules:
        m = pattern.match(name)
        if m:
            return dst.format(i=m.group("i")) if "i" in m.groupdict() else dst
    return None


_GGUF_RULES = _compile(GGUF_TO_GEMMAKIT)
# gemmakit name -> the GGUF name llama.cpp's converter writes (the parameters split in two above are written whole).
_GEMMAKIT_RULES = _compile({ours: src for src, ours in GGUF_TO_GEMMAKIT.items() if split_part(ours) is None})


def gguf_to_gemmakit(name: str) -> str | None:
    """Our parameter name for a GGUF tensor name, or None if the table has no row for it."""
    return _apply(_GGUF_RULES, name)


def gemmakit_to_gguf(ours: str) -> str | None:
    """The GGUF (llama.cpp) tensor name of one of our parameters, or None if the table has no row for it."""
    return _apply(_GEMMAKIT_RULES, ours)


# Hugging Face checkpoints: our module tree mirrors transformers', so a text weight's name is ours behind one of
# these prefixes (text-only *ForCausalLM, then the multimodal *ForConditionalGeneration layouts).
HF_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
# Parts of multimodal checkpoints that a text-only decoder knowingly leaves out.
HF_SKIPPED_PREFIXES = (
    "model.vision_tower.",
    "model.audio_tower.",
    "model.multi_modal_projector.",
    "model.embed_vision.",
    "model.embed_audio.",
    "vision_tower.",
    "audio_tower.",
    "multi_modal_projector.",
)
# The output head is tied to the embedding in every Gemma; a stored copy is redundant.
HF_TIED_HEADS = ("lm_head.weight", "language_model.lm_head.weight")


# Gemma 1 has no post-norms; transformers names its pre-MLP norm the Llama way.
HF_ARCH_RENAMES = {"gemma": {".post_attention_layernorm.": ".pre_feedforward_layernorm."}}


def hf_to_gemmakit(name: str, architecture: str = "") -> str | None:
    """Our parameter name for a HF checkpoint tensor, "" for a tensor skipped on purpose, None if unknown."""
    if name in HF_TIED_HEADS or name.startswith(HF_SKIPPED_PREFIXES):
        return ""
    for prefix in HF_TEXT_PREFIXES:
        if name.startswith(prefix):
            ours = name[len(prefix) :]
            for old, new in HF_ARCH_RENAMES.get(architecture, {}).items():
                ours = ours.replace(old, new)
            return ours
    return None


def is_shifted_norm(name: str) -> bool:
    """Gemma 1-3 HF norms store w for a (1 + w) multiplier; ours hold the multiplier."""
    return name.endswith("norm.weight")
