"""Weight loading: checkpoint files -> a ready :class:`~gemmakit.model.Gemma`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from ..config import GemmaConfig, config_from_gguf
from ..errors import UnsupportedModelError, WeightError
from ..model import Gemma
from ..quant.ggml import SUPPORTED_TYPES, dequantize
from .gguf import GGUFFile
from .names import gguf_to_gemmakit

logger = logging.getLogger(__name__)


def _raw_tensor(gguf: GGUFFile, name: str) -> torch.Tensor:
    with warnings.catch_warnings():
        # The map is read-only; we never write through these views.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(gguf.tensor_bytes(name))


def load_gguf_model(gguf: GGUFFile, dtype: torch.dtype = torch.float32) -> tuple[Gemma, GemmaConfig]:
    """Build the model described by a GGUF file and fill it with its (dequantized) weights.

    Raises:
        UnsupportedModelError: unknown architecture or tensor type.
        WeightError: a tensor the model needs is missing, misshaped, or one the model does not know is present.
    """
    config = config_from_gguf(gguf.metadata, str(gguf.path))
    with torch.device("meta"):
        model = Gemma(config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    for name, info in gguf.tensors.items():
        ours = gguf_to_gemmakit(name)
        if ours is None or ours not in expected:
            raise WeightError(f"{gguf.path}: unexpected tensor {name!r} (not part of a {config.architecture} model)")
        if tuple(info.shape) != tuple(expected[ours]):
            raise WeightError(
                f"{gguf.path}: tensor {name!r} has shape {list(info.shape)}, expected {list(expected[ours])}"
            )
        if info.ggml_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(f"{gguf.path}: tensor {name!r} has unsupported type {info.ggml_type.name}")
        state[ours] = dequantize(_raw_tensor(gguf, name), info.ggml_type, info.shape, name).to(dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise WeightError(f"{gguf.path}: missing tensors for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    model.load_state_dict(state, assign=True, strict=True)
    model.init_buffers()  # RoPE tables were created on the meta device
    model.eval()
    return model, config


def open_gguf(path: str | Path) -> GGUFFile:
    return GGUFFile(path)
