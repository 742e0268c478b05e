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


@pytest.fixture(scope="session")
def hf_model(model_path: Path):
    """transformers' Gemma3ForCausalLM from the same GGUF (dequantized to fp32, eager attention): the reference.

    Loading takes about a minute on 2 cores, so it happens once per session.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    return model
