"""Every Gemma generation against transformers' own model on the same random weights.

Each case builds a tiny config with transformers' config classes, saves the model with ``save_pretrained``,
loads the folder with gemmakit and compares logits (fp32, eager attention) over a sequence longer than the
sliding window; then checks cached one-token decoding and a padded batch against the full forward.
"""

from __future__ import annotations

import pytest
import torch

import gemmakit
from gemmakit.kv_cache import KVCache

VOCAB, SEQ, WINDOW = 300, 40, 8


def randomize(model: torch.nn.Module, gemma4: bool, seed: int = 0) -> None:
    """Random weights everywhere (not the init defaults), so every parameter matters in the comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or name.endswith("router.scale"):
                p.copy_((1.0 if gemma4 else 0.0) + 0.2 * noise)
            elif name.endswith("per_expert_scale"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(noise * (0.5 if "embed" in name else 0.08))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def gemma1():
    from transformers import GemmaConfig

    return GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def gemma2():
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                        sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0)


def gemma3(scaled: bool):
    from transformers import Gemma3TextConfig

    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0} if scaled
            else {"rope_type": "default", "rope_theta": 1_000_000.0}}
    return Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                            sliding_window=WINDOW, query_pre_attn_scalar=16, rope_parameters=rope)


def gemma4(kind: str):
    from transformers import Gemma4TextConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, head_dim=16,
                global_head_dim=32, max_position_embeddings=256, sliding_window=WINDOW,
                final_logit_softcapping=30.0)
    if kind == "e2b":  # PLE, KV sharing of the last 5 layers (the last owner is global, as in the real E2B), double-wide MLP there, 4:1 pattern
        types = (["sliding_attention"] * 4 + ["full_attention"]) * 2
        return Gemma4TextConfig(**base, num_hidden_layers=10, num_key_value_heads=1, layer_types=types,
                                hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
                                num_kv_shared_layers=5, use_double_wide_mlp=True)
    types = (["sliding_attention"] * 5 + ["full_attention"])
    if kind == "31b":  # K = V on global layers with their own KV-head count
        return Gemma4TextConfig(**base, num_hidden_layers=6, num_key_value_heads=2, layer_types=types,
                                hidden_size_per_layer_input=0, attention_k_eq_v=True, num_global_key_value_heads=1)
    # 26b-a4b: dense MLP plus a mixture of experts in every layer
    return Gemma4TextConfig(**base, num_hidden_layers=6, num_key_value_heads=2, layer_types=types,
                            hidden_size_per_layer_input=0, attention_k_eq_v=True, num_global_key_value_heads=1,
                            enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=24)


FAMILIES = {
    "gemma1": gemma1,
    "gemma2": gemma2,
    "gemma3": lambda: gemma3(False),
    "gemma3_rope_scaled": lambda: gemma3(True),
    "gemma4_e2b": lambda: gemma4("e2b"),
    "gemma4_31b": lambda: gemma4("31b"),
    "gemma4_26b_a4b": lambda: gemma4("26b"),
}


def build(name: str, folder, factory=None):
    """transformers reference model with random weights, saved to `folder` and loaded by gemmakit."""
    from transformers import AutoModelForCausalLM

    config = (factory or FAMILIES[name])()
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    randomize(ref, gemma4=name.startswith("gemma4"))
    ref.save_pretrained(folder)
    llm = gemmakit.load(folder, dtype="float32")
    ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(1)).tolist()
    return name, ref, llm, ids


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    return build(request.param, tmp_path_factory.mktemp(request.param))


@torch.inference_mode()
def test_logits_match_transformers(family) -> None:
    name, ref, llm, ids = family
    ours = llm.logits(ids)
    theirs = ref(torch.tensor([ids])).logits[0].float()
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: max |logits - transformers| = {diff:.2e} over {len(ids)} tokens (window {WINDOW})")
    assert diff <= 1e-4


@torch.inference_mode()
def test_cached_decoding_matches_full_forward(family) -> None:
    name, _, llm, ids = family
    model = llm.model
    tokens = torch.tensor([ids])
    full = model.logits(model(tokens, torch.arange(len(ids)).unsqueeze(0))[0])
    cache = KVCache(model.config, 1, len(ids))
    steps = [model(tokens[:, :3], torch.arange(3).unsqueeze(0), cache)[0]]
    for t in range(3, len(ids)):
        steps.append(model(tokens[:, t : t + 1], torch.tensor([[t]]), cache)[0])
    diff = (model.logits(torch.cat(steps)) - full).abs().max().item()
    assert diff <= 1e-4, f"{name}: cached decode differs by {diff:.2e}"


@torch.inference_mode()
def test_padded_batch_matches_separate_runs(family) -> None:
    name, _, llm, ids = family
    model = llm.model
    a, b = ids, ids[5:][::-1][:23]  # two prompts of different lengths
    T = max(len(a), len(b))
    tokens = torch.zeros(2, T, dtype=torch.long)
    positions = torch.full((2, T), -1, dtype=torch.long)
    for row, seq in enumerate((a, b)):  # left padding: position -1 marks padding
        tokens[row, T - len(seq):] = torch.tensor(seq)
        positions[row, T - len(seq):] = torch.arange(len(seq))
    cache = KVCache(model.config, 2, T + 4)
    batched = model.logits(model(tokens, positions, cache))
    for row, seq in enumerate((a, b)):
        alone = model.logits(model(torch.tensor([seq]), torch.arange(len(seq)).unsqueeze(0))[0])
        diff = (batched[row, T - len(seq):] - alone).abs().max().item()
        assert diff <= 1e-4, f"{name}: row {row} differs by {diff:.2e}"
    # One more decode step per row, each at its own position.
    nxt = torch.tensor([[7], [11]])
    step = model.logits(model(nxt, torch.tensor([[len(a)], [len(b)]]), cache))
    for row, seq in enumerate((a, b)):
        alone = model.logits(model(torch.tensor([seq + [int(nxt[row])]]), torch.arange(len(seq) + 1).unsqueeze(0))[0, -1])
        assert (step[row, 0] - alone).abs().max().item() <= 1e-4


def test_only_cache_owning_layers_allocate(family) -> None:
    name, _, llm, _ = family
    cache = KVCache(llm.config, 1, 64)
    owners = [spec.kv_source is None for spec in llm.config.layers]
    assert [c is not None for c in cache.layers] == owners
    if name == "gemma4_e2b":
        assert owners.count(False) == 5


# llama.cpp's Gemma 4 tensor names, written out here independently of gemmakit's own table.
LLAMACPP_GEMMA4 = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
    "per_layer_model_projection.weight": "per_layer_model_proj.weight",
    "per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
}
LLAMACPP_GEMMA4_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "layer_scalar": "layer_output_scale.weight",
    "per_layer_input_gate.weight": "inp_gate.weight",
    "per_layer_projection.weight": "proj.weight",
    "post_per_layer_input_norm.weight": "post_norm.weight",
    "router.proj.weight": "ffn_gate_inp.weight",
    "router.scale": "ffn_gate_inp.scale",
    "router.per_expert_scale": "ffn_down_exps.scale",
    "experts.gate_up_proj": "ffn_gate_up_exps.weight",
    "experts.down_proj": "ffn_down_exps.weight",
    "pre_feedforward_layernorm_2.weight": "pre_ffw_norm_2.weight",
    "post_feedforward_layernorm_1.weight": "post_ffw_norm_1.weight",
    "post_feedforward_layernorm_2.weight": "post_ffw_norm_2.weight",
}


def write_tiny_vocab(w) -> None:
    """A SentencePiece-style vocabulary of VOCAB pieces: specials, 256 byte pieces, filler words."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"w{i}" for i in range(VOCAB - len(pieces))]
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * len(pieces))
    w.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * (VOCAB - 260))


def write_gemma4_gguf(ref, gguf_specs, path, split_experts: bool = False, drop: str | None = None,
                      vocab=write_tiny_vocab, qtype: str | None = None, qtypes: dict | None = None) -> None:
    """The transformers model's weights as a llama.cpp-layout Gemma 4 GGUF (F32). ``split_experts`` writes the
    experts' gate and up halves as ``ffn_gate_exps`` / ``ffn_up_exps`` instead of one ``ffn_gate_up_exps``;
    ``vocab(writer)`` writes the tokenizer; ``qtype`` ("Q8_0", "Q4_1", ...) stores every matrix (and expert stack)
    whose rows are whole 32-blocks in that type, quantized by gguf-py (bit-exact with llama.cpp's quantizer); ``qtypes`` maps
    a tensor name's ending (``"attn_v.weight"``) to another type for those tensors."""
    import numpy as np
    from gguf import GGUFWriter

    c = ref.config
    w = GGUFWriter(str(path), "gemma4")
    a = "gemma4."
    w.add_uint32(a + "context_length", c.max_position_embeddings)
    w.add_uint32(a + "embedding_length", c.hidden_size)
    w.add_uint32(a + "block_count", c.num_hidden_layers)
    widths = [layer.mlp.gate_proj.out_features for layer in ref.model.layers]
    w.add_array(a + "feed_forward_length", widths)
    w.add_uint32(a + "attention.head_count", c.num_attention_heads)
    kv = [llm_layer.num_key_value_heads for llm_layer in gguf_specs]
    w.add_array(a + "attention.head_count_kv", kv)
    w.add_uint32(a + "attention.key_length", 32)
    w.add_uint32(a + "attention.key_length_swa", 16)
    w.add_uint32(a + "attention.value_length", 32)
    w.add_uint32(a + "attention.value_length_swa", 16)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    w.add_uint32(a + "rope.dimension_count", 32)  # llama.cpp's converter: the global head_dim (rope_freqs
    w.add_uint32(a + "rope.dimension_count_swa", 16)  # freezes the unrotated pairs), and the sliding head_dim
    w.add_float32(a + "rope.freq_base", 1_000_000.0)
    w.add_float32(a + "rope.freq_base_swa", 10_000.0)
    w.add_uint32(a + "attention.sliding_window", c.sliding_window)
    w.add_array(a + "attention.sliding_window_pattern", [t == "sliding_attention" for t in c.layer_types])
    w.add_uint32(a + "attention.shared_kv_layers", c.num_kv_shared_layers)
    w.add_uint32(a + "embedding_length_per_layer_input", c.hidden_size_per_layer_input or 0)
    w.add_float32(a + "final_logit_softcapping", c.final_logit_softcapping)
    if c.enable_moe_block:
        w.add_uint32(a + "expert_count", c.num_experts)
        w.add_uint32(a + "expert_used_count", c.top_k_experts)
        w.add_uint32(a + "expert_feed_forward_length", c.moe_intermediate_size)
    vocab(w)
    # Proportional RoPE as llama.cpp encodes it: divisor 1 for rotated pairs, 1e30 for frozen ones.
    rotated = int(0.25 * 32 // 2)
    w.add_tensor("rope_freqs.weight", np.array([1.0] * rotated + [1e30] * (16 - rotated), dtype=np.float32))
    for name, tensor in ref.model.state_dict().items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest not in LLAMACPP_GEMMA4_LAYER:
                continue  # e.g. k/v of KV-shared layers, absent in llama.cpp files
            target = f"blk.{i}.{LLAMACPP_GEMMA4_LAYER[rest]}"
            if split_experts and rest == "experts.gate_up_proj":
                gate, up = tensor.detach().float().chunk(2, dim=1)
                for part, half in (("ffn_gate_exps", gate), ("ffn_up_exps", up)):
                    if f"blk.{i}.{part}.weight" != drop:
                        w.add_tensor(f"blk.{i}.{part}.weight", half.numpy().copy())
                continue
        elif name in LLAMACPP_GEMMA4:
            target = LLAMACPP_GEMMA4[name]
        else:
            continue
        array = tensor.detach().float().numpy().copy()
        chosen = next((t for end, t in (qtypes or {}).items() if target.endswith(end)), qtype)
        if chosen and array.ndim in (2, 3) and array.shape[-1] % 32 == 0:  # 3-D: expert stacks, row by row
            from gguf import GGMLQuantizationType, quants

            kind = GGMLQuantizationType[chosen]
            w.add_tensor(target, quants.quantize(array, kind), raw_dtype=kind)
            continue
        w.add_tensor(target, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("name,split_experts", [("gemma4_e2b", False), ("gemma4_31b", False),
                                                ("gemma4_26b_a4b", False), ("gemma4_26b_a4b", True)])
@torch.inference_mode()
def test_gemma4_gguf_matches_safetensors(name, split_experts, tmp_path) -> None:
    name, ref, llm, ids = build(name, tmp_path / "hf")
    path = tmp_path / f"{name}.gguf"
    write_gemma4_gguf(ref, llm.config.layers, path, split_experts)
    from_gguf = gemmakit.load(path)
    diff = (from_gguf.logits(ids) - llm.logits(ids)).abs().max().item()
    print(f"{name}: GGUF vs safetensors max |logits diff| = {diff:.2e}")
    assert diff <= 1e-4


@torch.inference_mode()
def test_half_of_split_expert_pair_missing_is_an_error(tmp_path) -> None:
    name, ref, llm, _ = build("gemma4_26b_a4b", tmp_path / "hf")
    path = tmp_path / "broken.gguf"
    write_gemma4_gguf(ref, llm.config.layers, path, split_experts=True, drop="blk.2.ffn_up_exps.weight")
    from gemmakit.errors import WeightError

    with pytest.raises(WeightError, match="missing tensors for layers.2.experts.gate_up_proj"):
        gemmakit.load(path)


LLAMACPP_GEMMA123_LAYER = {k: v for k, v in LLAMACPP_GEMMA4_LAYER.items() if not k.startswith(
    ("layer_scalar", "per_layer", "post_per_layer", "router", "experts", "pre_feedforward_layernorm_2",
     "post_feedforward_layernorm_"))}


def write_gemma123_gguf(ref, arch: str, path) -> None:
    """A Gemma 1/2/3 transformers model as a llama.cpp GGUF: norms shifted to 1 + w, as the converter does."""
    from gguf import GGUFWriter

    c = ref.config
    w = GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch != "gemma":
        w.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        w.add_float32("gemma2.attn_logit_softcapping", c.attn_logit_softcapping)
        w.add_float32("gemma2.final_logit_softcapping", c.final_logit_softcapping)
        w.add_rope_freq_base(10_000.0)
    elif arch == "gemma3":
        w.add_rope_freq_base(1_000_000.0)
    else:
        w.add_rope_freq_base(10_000.0)
    write_tiny_vocab(w)
    renames = dict(LLAMACPP_GEMMA123_LAYER)
    if arch == "gemma":  # transformers' Gemma 1 calls its pre-MLP norm post_attention_layernorm
        renames["post_attention_layernorm.weight"] = "ffn_norm.weight"
    for name, tensor in ref.model.state_dict().items():
        array = tensor.detach().float().numpy().copy()
        if name.endswith("norm.weight"):
            array = array + 1.0
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            target = f"blk.{i}.{renames[rest]}"
        else:
            target = LLAMACPP_GEMMA4[name]
        w.add_tensor(target, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gemma2_head_dim_scaled():
    # llama.cpp derives Gemma 2's query scale from head_dim, so the GGUF case uses query_pre_attn_scalar = head_dim.
    config = gemma2()
    config.query_pre_attn_scalar = config.head_dim
    return config


@pytest.mark.parametrize("name,arch,factory", [("gemma1", "gemma", gemma1), ("gemma2", "gemma2", gemma2_head_dim_scaled),
                                               ("gemma3", "gemma3", lambda: gemma3(False))])
@torch.inference_mode()
def test_gemma123_gguf_matches_safetensors(name, arch, factory, tmp_path) -> None:
    name, ref, llm, ids = build(name, tmp_path / "hf", factory)
    path = tmp_path / f"{name}.gguf"
    write_gemma123_gguf(ref, arch, path)
    from_gguf = gemmakit.load(path)
    assert from_gguf.config.architecture == arch
    diff = (from_gguf.logits(ids) - llm.logits(ids)).abs().max().item()
    assert diff <= 1e-4, f"{arch}: GGUF vs safetensors differ by {diff:.2e}"


def test_gguf_only_options_are_refused_for_hf_folders(tmp_path) -> None:
    from gemmakit.errors import InvalidParameterError

    build("gemma1", tmp_path)
    with pytest.raises(InvalidParameterError, match="quant='bf16' apply to GGUF files"):
        gemmakit.load(tmp_path, quant="bf16")  # HF folders take dtype=, or int8 / int4 (tests/test_quant_hf.py)
    with pytest.raises(InvalidParameterError, match="apply to GGUF files"):
        gemmakit.load(tmp_path, memory_budget=10**9)
