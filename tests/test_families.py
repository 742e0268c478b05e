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
    if kind == "e2b":  # PLE, KV sharing of the last 4 layers, double-wide MLP there, 4:1 pattern
        types = (["sliding_attention"] * 4 + ["full_attention"]) * 2
        return Gemma4TextConfig(**base, num_hidden_layers=10, num_key_value_heads=1, layer_types=types,
                                hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
                                num_kv_shared_layers=4, use_double_wide_mlp=True)
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


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    config = FAMILIES[request.param]()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    randomize(ref, gemma4=request.param.startswith("gemma4"))
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    llm = gemmakit.load(folder, dtype="float32")
    ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(1)).tolist()
    return request.param, ref, llm, ids


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
        assert owners.count(False) == 4
