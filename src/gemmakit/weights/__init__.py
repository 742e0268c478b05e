"""Weight loading: checkpoint files -> a ready :class:`~gemmakit.model.Gemma`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from ..config import GemmaConfig, config_from_gguf, config_from_hf
from ..errors import InvalidParameterError, ModelTooLargeError, UnsupportedModelError, WeightError
from ..kernels.fused import choose_decode_path
from ..model import Gemma
from ..quant.ggml import QUANTIZED_TYPES, SUPPORTED_TYPES, dequantize, split_packed
from ..quant.linear import (MappedEmbedding, QuantEmbedding, QuantExperts, QuantLinear, QuantWeight,
                            fast_prefill_dtype, fuse_projections, set_prefill_dtype)
from .gguf import GGUFFile
from ..quant.convert import EXPERT_MATRICES, QUANT_TYPES, quantize_matrix, quantized_parameter
from .hf import iter_tensors, read_config, read_rows, safetensor_files, tensor_entries
from .names import GGUF_CONFIG_TENSORS, gguf_to_gemmakit, hf_to_gemmakit, is_shifted_norm, split_part

logger = logging.getLogger(__name__)


def _raw_tensor(gguf: GGUFFile, name: str) -> torch.Tensor:
    with warnings.catch_warnings():
        # The map is read-only; we never write through these views.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(gguf.tensor_bytes(name))


QUANT_MODES = ("auto", "int8", "fp32", "bf16")
# Tables read a row at a time and never as a whole: they stay in the file's map (quant/linear.MappedEmbedding).
MAPPED_TABLES = {"embed_tokens_per_layer.weight"}


def module_and_attr(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, leaf = name.rpartition(".")  # "layers.0.self_attn.q_proj.weight" -> module q_proj, leaf "weight"
    owner_path, _, attr = path.rpartition(".")
    return (model.get_submodule(owner_path) if owner_path else model), attr


def _keeps_quantized(quant: str, info, ours: str, model: torch.nn.Module) -> bool:
    """Quantized 2-D linear and embedding weights stay int8 in 'auto'/'int8' mode."""
    if quant not in ("auto", "int8") or info.ggml_type not in QUANTIZED_TYPES or len(info.shape) != 2:
        return False
    if not ours.endswith(".weight"):
        return False
    owner, attr = module_and_attr(model, ours)
    return isinstance(getattr(owner, attr), (torch.nn.Linear, torch.nn.Embedding))


def estimate_bytes(gguf: GGUFFile, quant: str) -> int:
    """Memory the loaded weights will take, computed from the header alone."""
    total = 0
    for info in gguf.tensors.values():
        n = info.n_elements
        if quant in ("auto", "int8") and info.ggml_type in QUANTIZED_TYPES and len(info.shape) == 2:
            total += n + n // 16 * 4  # int8 values, float scales (and mins) per group
        else:
            total += n * (2 if quant == "bf16" else 4)
    return total


def load_gguf_model(
    gguf: GGUFFile, quant: str = "auto", memory_budget: int | None = None
) -> tuple[Gemma, GemmaConfig]:
    """Build the model described by a GGUF file and fill it with its weights.

    ``quant``: "auto" / "int8" keep quantized GGUF matrices as int8 + per-group scales (float tensors stay
    float32); "fp32" and "bf16" dequantize everything. "auto" picks the prompt matmuls' fast_prefill_dtype (see
    quant.linear.set_prefill_dtype); "int8" keeps them all in float32.

    Raises:
        UnsupportedModelError: unknown architecture or tensor type.
        WeightError: a tensor the model needs is missing, misshaped, or one the model does not know is present.
        ModelTooLargeError: the weights would not fit ``memory_budget`` bytes (checked before allocating).
    """
    if quant not in QUANT_MODES:
        raise InvalidParameterError(f"quant={quant!r}: supported modes are {', '.join(QUANT_MODES)}")
    _check_budget(gguf, quant, memory_budget)
    dtype = torch.bfloat16 if quant == "bf16" else torch.float32
    config = _gguf_config(gguf)
    with torch.device("meta"):
        model = Gemma(config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantWeight] = {}
    mapped: set[str] = set()
    parts: dict[str, list[torch.Tensor | None]] = {}  # parameters stored as several tensors, stacked on dim 1
    experts: dict[str, list[QuantWeight]] = {}  # expert stacks kept quantized, one matrix per expert
    for name, info in gguf.tensors.items():
        if name in GGUF_CONFIG_TENSORS:
            continue
        ours, part, base = _gguf_target(gguf, config, expected, name, info)
        if part:
            slots = parts.setdefault(base, [None] * part[2])
            slots[part[1]] = dequantize(_raw_tensor(gguf, name), info.ggml_type, info.shape, name).to(dtype)
        elif ours in MAPPED_TABLES and quant in ("auto", "int8"):
            owner, attr = module_and_attr(model, ours)
            setattr(owner, attr, MappedEmbedding(_raw_tensor(gguf, name), info.ggml_type, tuple(info.shape)))
            mapped.add(ours)
            continue  # its pages stay mapped (not released): lookups read them
        elif _keeps_quantized(quant, info, ours, model):
            quantized[ours] = QuantWeight.from_packed(*split_packed(_raw_tensor(gguf, name), info.ggml_type, info.shape),
                                                      *info.shape)
        elif quant in ("auto", "int8") and info.ggml_type in QUANTIZED_TYPES and ours.endswith(EXPERT_MATRICES):
            experts[ours] = _expert_weights(_raw_tensor(gguf, name), info.ggml_type, tuple(info.shape))
        else:
            state[ours] = dequantize(_raw_tensor(gguf, name), info.ggml_type, info.shape, name).to(dtype).clone()
        gguf.release(name)
    state |= {base: torch.cat(slots, dim=1) for base, slots in parts.items() if None not in slots}  # type: ignore
    check_complete(gguf.path, expected, state, quantized, mapped, experts)
    _install_quantized(model, quantized)
    _install_experts(model, experts, state, dtype)
    model.load_state_dict(state, assign=True, strict=True)
    # Only the model may hold the weights now: fusing frees the unfused parts, and the trim below can return
    # their pages only if nothing else still references them (measured: 34 MB more resident otherwise).
    del state, quantized, parts
    fuse_projections(model)
    if quant == "auto":  # quant="int8" keeps float32 prompt products on every CPU
        set_prefill_dtype(model, fast_prefill_dtype())
    release_freed_memory()
    return _ready(model), config


def _ready(model: Gemma) -> Gemma:
    """The last steps of every load: RoPE tables (created on the meta device), eval mode, and the decode path
    chosen once for the model (kernels/fused.choose_decode_path), logged."""
    model.init_buffers()
    model.eval()
    model.decode_path = choose_decode_path(model)
    logger.info("decode path: %s", model.decode_path)
    return model


def _check_budget(gguf: GGUFFile, quant: str, memory_budget: int | None) -> None:
    if memory_budget is not None:
        need = estimate_bytes(gguf, quant)
        if need > memory_budget:
            raise ModelTooLargeError(
                f"{gguf.path}: the weights need about {need / 2**20:.0f} MiB with quant={quant!r}, more than the "
                f"memory budget of {memory_budget / 2**20:.0f} MiB"
            )


def _gguf_config(gguf: GGUFFile) -> GemmaConfig:
    rope_freqs = None
    if "rope_freqs.weight" in gguf.tensors:
        info = gguf.tensors["rope_freqs.weight"]
        rope_freqs = dequantize(_raw_tensor(gguf, "rope_freqs.weight"), info.ggml_type, info.shape).tolist()
    return config_from_gguf(gguf.metadata, str(gguf.path), gguf.tensors, rope_freqs)


def _gguf_target(gguf: GGUFFile, config: GemmaConfig, expected: dict, name: str, info) -> tuple:
    """(our parameter name, its part (name, k, n) when stored in n pieces or None, the parameter it fills), after
    checking that the tensor belongs to the model, fits its shape and has a supported type."""
    ours = gguf_to_gemmakit(name)
    part = split_part(ours) if ours is not None else None
    base = part[0] if part else ours
    if base is None or base not in expected:
        raise WeightError(f"{gguf.path}: unexpected tensor {name!r} (not part of a {config.architecture} model)")
    want = list(expected[base])
    if part:
        want[1] //= part[2]
    if list(info.shape) != want:
        raise WeightError(f"{gguf.path}: tensor {name!r} has shape {list(info.shape)}, expected {want}")
    if info.ggml_type not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"{gguf.path}: tensor {name!r} has unsupported type {info.ggml_type.name}")
    return ours, part, base


def release_freed_memory() -> None:
    """Return the conversion temporaries' heap pages to the OS (glibc keeps them otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _shared_kv_leftover(config: GemmaConfig, ours: str) -> bool:
    """KV-shared Gemma 4 layers have no k/v projections; some checkpoints still carry them (unused)."""
    parts = ours.split(".")
    if len(parts) >= 4 and parts[0] == "layers" and parts[1].isdigit() and parts[2] == "self_attn":
        layer = int(parts[1])
        return layer < config.num_hidden_layers and config.layer(layer).kv_source is not None and parts[3] in (
            "k_proj", "v_proj", "k_norm", "v_norm")
    return False


def load_hf_model(folder: Path, dtype: str | None = None, quant: str | None = None) -> tuple[Gemma, GemmaConfig]:
    """Build a model from a Hugging Face folder (config.json + safetensors), in the asked dtype.

    ``dtype`` None keeps the checkpoint's own dtype. Norm weights stay float32 (they are tiny and the
    reference applies them in float32). ``quant`` "int8" / "int4" quantizes the matrices while loading
    (see :func:`load_hf_quantized`).

    Raises:
        ModelNotFoundError, CorruptFileError, UnsupportedModelError, WeightError, InvalidParameterError.
    """
    if dtype is not None and dtype not in DTYPES:
        raise InvalidParameterError(f"dtype={dtype!r}: use None, {', '.join(DTYPES)}")
    if quant is not None:
        if dtype is not None:
            raise InvalidParameterError(f"dtype={dtype!r} and quant={quant!r}: choose one (with quant=, the "
                                        "matrices are quantized and the other weights are float32)")
        return load_hf_quantized(folder, quant)
    config, model, expected, shift = empty_hf_model(folder)
    state: dict[str, torch.Tensor] = {}
    for name, tensor, file in iter_tensors(safetensor_files(folder)):
        ours = hf_target(config, expected, name, tuple(tensor.shape), file)
        if ours is None:
            continue
        if is_shifted_norm(ours):
            state[ours] = tensor.float() + 1.0 if shift else tensor.float()
        else:
            state[ours] = tensor.to(DTYPES[dtype]) if dtype else tensor
    check_complete(folder, expected, state)
    if len({t.dtype for n, t in state.items() if not is_shifted_norm(n)}) > 1:
        target = DTYPES[dtype] if dtype else torch.float32
        state = {n: (t if is_shifted_norm(n) else t.to(target)) for n, t in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    return _ready(model), config


def empty_hf_model(folder: Path) -> tuple[GemmaConfig, Gemma, dict, bool]:
    """(config, the model on the meta device, its parameters by name, whether norms are stored as w - 1)."""
    config = config_from_hf(read_config(folder), str(folder / "config.json"))
    with torch.device("meta"):
        model = Gemma(config)
    return config, model, dict(model.named_parameters()), config.architecture in ("gemma", "gemma2", "gemma3")


def hf_target(config: GemmaConfig, expected: dict, name: str, shape: tuple[int, ...], file: Path) -> str | None:
    """The parameter a checkpoint tensor fills (None: one to skip), after checking it belongs and fits."""
    ours = hf_to_gemmakit(name, config.architecture)
    if ours == "" or (ours is not None and _shared_kv_leftover(config, ours)):
        return None
    if ours is None or ours not in expected:
        raise WeightError(f"{file}: unexpected tensor {name!r} (not part of a {config.architecture} text model)")
    if shape != tuple(expected[ours].shape):
        raise WeightError(f"{file}: tensor {name!r} has shape {list(shape)}, expected {list(expected[ours].shape)}")
    return ours


def check_complete(source, expected, *filled) -> None:
    missing = sorted(set(expected) - set().union(*filled))
    if missing:
        raise WeightError(f"{source}: missing tensors for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))


def load_hf_quantized(folder: Path, quant: str) -> tuple[Gemma, GemmaConfig]:
    """A Hugging Face folder with its matrices quantized while loading: "int8" (Q8_0) or "int4" (Q4_1), the same
    packed layouts as a GGUF of those types (quant/convert.py). Each matrix is read a slice of rows at a time with
    file reads (not a memory map), so the peak memory stays near the quantized size, never the bf16 model's. The
    other weights (norms, scalars, the MoE router, matrices whose rows are not whole 32-blocks) are float32."""
    if quant not in QUANT_TYPES:
        raise InvalidParameterError(f"quant={quant!r}: for a Hugging Face folder use 'int8' or 'int4' (or dtype=)")
    config, model, expected, shift = empty_hf_model(folder)
    state: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantWeight] = {}
    experts: dict[str, list[QuantWeight]] = {}
    for entry in tensor_entries(safetensor_files(folder)):
        ours = hf_target(config, expected, entry.name, entry.shape, entry.file)
        if ours is None:
            continue
        owner, attr = module_and_attr(model, ours)
        is_matrix = isinstance(getattr(owner, attr), (torch.nn.Linear, torch.nn.Embedding))
        if not quantized_parameter(ours, entry.shape, is_matrix):
            tensor = read_rows(entry).float()
            state[ours] = tensor + 1.0 if shift and is_shifted_norm(ours) else tensor
        elif is_matrix:
            quantized[ours] = quantize_matrix(lambda a, b, e=entry: read_rows(e, a, b), *entry.shape, quant)
        else:  # an expert stack (experts, N, K): one packed matrix per expert
            experts[ours] = [quantize_matrix(lambda a, b, e=entry.part(i): read_rows(e, a, b), *entry.shape[1:], quant)
                             for i in range(entry.shape[0])]
    check_complete(folder, expected, state, quantized, experts)
    _install_quantized(model, quantized)
    _install_experts(model, experts, state, torch.float32)
    model.load_state_dict(state, assign=True, strict=True)
    del state, quantized
    fuse_projections(model)
    set_prefill_dtype(model, fast_prefill_dtype())  # as a GGUF of the same type loads by default
    release_freed_memory()
    return _ready(model), config


def _expert_weights(raw: torch.Tensor, qtype, shape: tuple[int, int, int]) -> list[QuantWeight]:
    """A GGUF expert stack (experts, N, K) as one packed matrix per expert (each expert's blocks are contiguous)."""
    n, N, K = shape
    per_expert = raw.reshape(n, -1)
    return [QuantWeight.from_packed(*split_packed(per_expert[e], qtype, (N, K)), N, K) for e in range(n)]


def _install_experts(model: Gemma, experts: dict[str, list[QuantWeight]], state: dict[str, torch.Tensor],
                     dtype: torch.dtype) -> None:
    """Replace each layer's float expert stacks with :class:`QuantExperts` where both of its stacks are quantized;
    a layer with one float stack (rows not whole blocks, or gate and up stored apart) gets both as float."""
    for gate_up_name in [n for n in experts if n.endswith(".gate_up_proj")]:
        down_name = gate_up_name.removesuffix("gate_up_proj") + "down_proj"
        if down_name in experts:
            owner, attr = module_and_attr(model, gate_up_name)  # the layer and its "experts" slot
            setattr(owner, attr, QuantExperts(experts.pop(gate_up_name), experts.pop(down_name)))
    for name, weights in experts.items():
        state[name] = torch.stack([w.dequantize() for w in weights]).to(dtype)


def _install_quantized(model: Gemma, quantized: dict[str, QuantWeight]) -> None:
    """Put each quantized weight in place of the float module it replaces."""
    for ours, weight in quantized.items():
        owner, attr = module_and_attr(model, ours)
        wrapper = QuantEmbedding if isinstance(getattr(owner, attr), torch.nn.Embedding) else QuantLinear
        setattr(owner, attr, wrapper(weight))
