"""``gemmakit quantize``: a Hugging Face folder written as a GGUF in llama.cpp's layout.

The tensors are llama.cpp's converter's: its names, norms as plain multipliers (Gemma 1-3 checkpoints store
``w`` for ``1 + w``), the embedding cut to the tokenizer's size, Gemma 4's ``rope_freqs``. Each tensor is read a
slice of rows at a time and written as it is quantized, so memory stays near one slice whatever the model's size.
The file is written under a temporary name and renamed when complete: a failure never leaves a half file.

Types written here: F32, F16, BF16, Q8_0 and Q4_1 (PyTorch, bit-exact with llama.cpp's reference quantizers,
quant/convert.py), Q4_0, Q5_0, Q5_1 (gguf-py's numpy quantizers, also bit-exact). The K-quant mixes (Q4_K_M,
Q6_K, ...) are llama.cpp's own recipe and quantizer: a BF16 GGUF is written first, then llama-cpp-python's
``llama_model_quantize`` makes the final file (it must be installed for those types).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..chat_template import find_checkpoint_template
from ..config import GemmaConfig
from ..errors import InvalidParameterError, UnsupportedModelError, WeightError
from ..llm import read_generation_config
from ..quant.convert import BYTE_PACKERS, KEPT_FLOAT, SLICE_VALUES, quantized_parameter
from ..sampling import checkpoint_defaults, gguf_sampling_keys
from ..weights import check_complete, empty_hf_model, hf_target, module_and_attr
from ..weights.hf import TensorEntry, read_rows, safetensor_files, tensor_entries
from ..weights.names import gemmakit_to_gguf, is_shifted_norm
from .metadata import architecture_keys, check_round_trip, rope_freqs
from .vocab import Vocabulary, read_vocabulary

logger = logging.getLogger(__name__)

# Types gemmakit writes itself -> gguf.LlamaFileType member (general.file_type).
OWN_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
             "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1"}
# llama.cpp's K-quant mixes (LLAMA_FTYPE_MOSTLY_<name>), made by its own quantizer.
LLAMACPP_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
GGUF_TYPES = tuple(OWN_TYPES) + LLAMACPP_TYPES

Progress = Callable[[str, int, int], None]  # (tensor name, tensors done, tensors in all)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the output file: where it comes from and how it is stored."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order, as written
    qtype: str  # a key of OWN_TYPES
    source: TensorEntry | None  # None: `values` holds it (rope_freqs)
    shift: bool = False  # add 1 (Gemma 1-3 norms)
    values: tuple[float, ...] = ()


def quantize_folder(folder: Path | str, out: Path | str, qtype: str = "Q8_0", progress: Progress | None = None,
                    threads: int | None = None) -> Path:
    """Write the Hugging Face checkpoint in ``folder`` as a GGUF of type ``qtype`` (see :data:`GGUF_TYPES`) at
    ``out``, in llama.cpp's layout (llama.cpp and gemmakit both load it). ``progress`` is called after each
    tensor; ``threads`` is llama.cpp's quantizer's thread count (K-quants; PyTorch's own setting serves the rest).

    Raises:
        InvalidParameterError: an unknown type, ``out`` inside nothing writable, a K-quant without
            llama-cpp-python, or a folder without the tokenizer file its GGUF needs.
        UnsupportedModelError: a setting llama.cpp's keys cannot express (see convert/metadata.py).
        ModelNotFoundError, CorruptFileError, WeightError: the folder's own problems, as when loading it.
    """
    folder, out = Path(folder), Path(out)
    if qtype not in GGUF_TYPES:
        raise InvalidParameterError(f"type {qtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    if not out.parent.is_dir():
        raise InvalidParameterError(f"{out}: its folder does not exist")
    if qtype in LLAMACPP_TYPES:
        return _quantize_with_llamacpp(folder, out, qtype, progress, threads)
    config, vocab, tensors = plan(folder, qtype)
    keys = file_keys(folder, config, vocab, qtype)
    check_round_trip(_with_vocab_size(config, len(vocab.pieces)), keys, {t.name for t in tensors}, str(folder))
    partial = out.with_name(out.name + ".partial")
    try:
        _write(partial, config.architecture, keys, tensors, progress)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("wrote %s (%s, %d tensors, %.1f MiB)", out, qtype, len(tensors), out.stat().st_size / 2**20)
    return out


def plan(folder: Path, qtype: str) -> tuple[GemmaConfig, Vocabulary, list[PlannedTensor]]:
    """The folder's configuration, tokenizer and output tensors, checked as a load checks them."""
    config, model, expected, shift = empty_hf_model(folder)
    vocab = read_vocabulary(folder, config.architecture)
    if len(vocab.pieces) > config.vocab_size:
        raise WeightError(f"{folder}: the tokenizer has {len(vocab.pieces)} pieces, the embedding only "
                          f"{config.vocab_size} rows")
    tensors: list[PlannedTensor] = []
    filled: set[str] = set()
    for entry in tensor_entries(safetensor_files(folder)):
        ours = hf_target(config, expected, entry.name, entry.shape, entry.file)
        if ours is None:
            continue
        filled.add(ours)
        shape = entry.shape
        if ours == "embed_tokens.weight":  # multimodal checkpoints pad it past the tokenizer; llama.cpp cuts it
            shape = (len(vocab.pieces), *shape[1:])
        owner, attr = module_and_attr(model, ours)
        is_matrix = isinstance(getattr(owner, attr), (torch.nn.Linear, torch.nn.Embedding))
        tensors.append(PlannedTensor(_gguf_name(ours), shape, _stored_type(qtype, ours, shape, is_matrix), entry,
                                     shift and is_shifted_norm(ours)))
    check_complete(folder, expected, filled)
    freqs = rope_freqs(config)
    if freqs is not None:
        tensors.insert(0, PlannedTensor("rope_freqs.weight", (len(freqs),), "F32", None, values=tuple(freqs)))
    return config, vocab, tensors


def _gguf_name(ours: str) -> str:
    name = gemmakit_to_gguf(ours)
    if name is None:
        raise UnsupportedModelError(f"parameter {ours!r} has no tensor name in llama.cpp's layout")
    return name


def _stored_type(qtype: str, ours: str, shape: tuple[int, ...], is_matrix: bool) -> str:
    """llama.cpp's converter's rule: vectors (norms, scalars) and the MoE router stay F32; matrices take the type
    when their rows are whole blocks (else F32, as quantize-at-load keeps them)."""
    if len(shape) < 2 or ours.endswith(KEPT_FLOAT):
        return "F32"
    if qtype in ("F32", "F16", "BF16"):
        return qtype
    return qtype if quantized_parameter(ours, shape, is_matrix) else "F32"


def file_keys(folder: Path, config: GemmaConfig, vocab: Vocabulary, qtype: str) -> dict[str, Any]:
    """Every metadata key of the file: general.*, the architecture's, the tokenizer's, the chat template, the
    recommended sampling."""
    import gguf

    keys: dict[str, Any] = {"general.architecture": config.architecture, "general.name": folder.resolve().name,
                            "general.file_type": int(gguf.LlamaFileType[OWN_TYPES[qtype]]),
                            "general.quantization_version": gguf.GGML_QUANT_VERSION}
    keys |= architecture_keys(config)
    keys |= vocab.keys()
    template = find_checkpoint_template(folder=folder)
    if template:
        keys["tokenizer.chat_template"] = template
    # The recommended sampling of generation_config.json, as llama.cpp's converter carries it over.
    recommended = checkpoint_defaults(generation_config=read_generation_config(folder))
    keys |= {key: np.int32(value) if key.endswith("top_k") else float(value)
             for key, value in gguf_sampling_keys(recommended).items()}
    return keys


def _with_vocab_size(config: GemmaConfig, size: int) -> GemmaConfig:
    return config if config.vocab_size == size else dataclasses.replace(config, vocab_size=size)


# -- writing ----------------------------------------------------------------------------------------------------

def _add_key(w, key: str, value: Any) -> None:
    """Typed as llama.cpp's converter types them: ints uint32, floats float32, arrays by their first element."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, np.int32):  # llama.cpp reads general.sampling.top_k as int32
        w.add_int32(key, int(value))
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


def _nbytes(t: PlannedTensor) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[t.qtype]]
    return int(np.prod(t.shape)) // block * size


def _write(path: Path, arch: str, keys: dict[str, Any], tensors: list[PlannedTensor], progress: Progress | None) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter

    w = GGUFWriter(str(path), arch)
    for key, value in keys.items():
        if key != "general.architecture":  # GGUFWriter writes it from its arch argument
            _add_key(w, key, value)
    for t in tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t), GGMLQuantizationType[t.qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    for done, t in enumerate(tensors):
        w.write_padding(f, f.tell())
        written, announced = 0, _nbytes(t)
        for chunk in _encoded_chunks(t):
            f.write(chunk)
            written += len(chunk)
        if written != announced:  # an internal invariant: the header announced this size
            raise RuntimeError(f"{t.name}: wrote {written} bytes, announced {announced}")
        w.write_padding(f, written)
        if progress:
            progress(t.name, done + 1, len(tensors))
    w.close()


def _float_slices(t: PlannedTensor) -> Iterator[torch.Tensor]:
    """The tensor as float32 rows (n, last dim), a slice at a time, in file order."""
    if t.source is None:
        yield torch.tensor(t.values, dtype=torch.float32).reshape(1, -1)
        return
    lead = t.shape[0]
    per_lead = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
    step = max(1, SLICE_VALUES // max(per_lead, 1))
    if len(t.shape) == 1:
        step = lead
    for start in range(0, lead, step):
        stop = min(lead, start + step)
        x = read_rows(t.source, start, stop).float()
        if t.shift:
            x = x + 1.0
        yield x.reshape(-1, t.shape[-1])


def _encoded_chunks(t: PlannedTensor) -> Iterator[bytes]:
    for x in _float_slices(t):
        yield _encode(x.contiguous(), t.qtype)


def _encode(x: torch.Tensor, qtype: str) -> bytes:
    """Float32 rows in one GGUF type's bytes."""
    if qtype == "F32":
        return x.numpy().tobytes()
    if qtype == "F16":
        return x.half().numpy().tobytes()
    if qtype == "BF16":  # round to nearest even, as gguf-py and llama.cpp do
        return x.bfloat16().view(torch.int16).numpy().tobytes()
    if qtype in BYTE_PACKERS:
        return BYTE_PACKERS[qtype](x).numpy().tobytes()
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(x.numpy(), GGMLQuantizationType[qtype]).tobytes()


# -- K-quants: llama.cpp's own quantizer ------------------------------------------------------------------------

def _quantize_with_llamacpp(folder: Path, out: Path, qtype: str, progress: Progress | None,
                            threads: int | None) -> Path:
    try:
        import llama_cpp
    except ImportError:
        raise InvalidParameterError(
            f"type {qtype}: the K-quant mixes are made by llama.cpp's quantizer; install llama-cpp-python, or choose "
            f"a type gemmakit writes itself ({', '.join(OWN_TYPES)})") from None
    bf16 = out.with_name(out.name + ".bf16.partial")
    partial = out.with_name(out.name + ".partial")
    try:
        quantize_folder(folder, bf16, "BF16", progress)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
        params.nthread = threads or os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(str(bf16).encode(), str(partial).encode(), params) != 0:
            raise UnsupportedModelError(f"{folder}: llama.cpp's quantizer refused the model (its log says why)")
        os.replace(partial, out)
    finally:
        bf16.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return out
