from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import gemmakit  # noqa: E402


@pytest.fixture(scope="session")
def model_path() -> Path:
    return gemmakit.default_model_path()


@pytest.fixture(scope="session")
def llm(model_path: Path) -> gemmakit.LLM:
    return gemmakit.load(model_path)


@pytest.fixture(scope="session")
def precise_llm(model_path: Path) -> gemmakit.LLM:
    """quant="int8": the same int8 weights as the default, with float32 prompt matmuls on every CPU (the default
    runs them in bfloat16 where the CPU has native bf16): the model to hold to transformers' numbers."""
    return gemmakit.load(model_path, quant="int8")


@pytest.fixture(scope="session")
def fp32_llm(model_path: Path) -> gemmakit.LLM:
    """quant="fp32": every weight dequantized to float32 and multiplied by PyTorch, on every path (no integer
    kernel, no bf16): the float32 reference for numbers that the kernels round (see README, Speed and memory)."""
    return gemmakit.load(model_path, quant="fp32")


# The bundled Gemma 3 270M's published configuration (google/gemma-3-270m config.json), written out here rather
# than read through gemmakit, so that the reference shares nothing with the code it checks.
GEMMA3_270M = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                   max_position_embeddings=32768, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
                   layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3)


@pytest.fixture(scope="session")
def hf_model(model_path: Path):
    """transformers' Gemma3ForCausalLM with the GGUF's weights (dequantized to fp32 by gguf-py, llama.cpp's
    reference dequantizer; eager attention): the reference.

    This is what ``from_pretrained(gguf_file=...)`` does (names mapped, norms stored as w for a 1 + w multiplier),
    without its parsing of the 262,144-piece vocabulary through numpy views, which took ~60 of its ~75 s here.
    """
    from gguf import GGMLQuantizationType, quants
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from gemmakit.weights.gguf import GGUFFile
    from test_families import LLAMACPP_GEMMA4, LLAMACPP_GEMMA123_LAYER

    to_hf = {v: k for k, v in LLAMACPP_GEMMA4.items() if k in ("embed_tokens.weight", "norm.weight")}
    to_hf |= {f"blk.{i}.{v}": f"layers.{i}.{k}" for k, v in LLAMACPP_GEMMA123_LAYER.items() for i in range(18)}
    gguf = GGUFFile(model_path)  # the container only: the values come from gguf-py
    state = {}
    for name, info in gguf.tensors.items():
        values = torch.tensor(quants.dequantize(gguf.tensor_bytes(name), GGMLQuantizationType(info.ggml_type)))
        values = values.reshape(info.shape).float()
        state["model." + to_hf[name]] = values - 1.0 if name.endswith("norm.weight") else values
    model = Gemma3ForCausalLM(Gemma3TextConfig(**GEMMA3_270M, attn_implementation="eager"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.float().eval()
