"""Hugging Face checkpoints: config.json plus (sharded) safetensors, memory-mapped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from ..errors import CorruptFileError, ModelNotFoundError


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CorruptFileError(f"{path}: expected a JSON object")
    return cfg


def safetensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptFileError(f"{index}: unreadable shard index ({exc})") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelNotFoundError(f"{folder}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder}: no *.safetensors weights")
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(name, tensor, file) for every tensor; tensors come from the memory map, not read ahead."""
    seen: set[str] = set()
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise CorruptFileError(f"{file}: not a readable safetensors file ({exc})") from None
        with handle as f:
            for name in f.keys():
                if name in seen:
                    raise CorruptFileError(f"{file}: tensor {name!r} appears in more than one shard")
                seen.add(name)
                try:
                    tensor = f.get_tensor(name)
                except Exception as exc:
                    raise CorruptFileError(f"{file}: cannot read tensor {name!r} ({exc})") from None
                yield name, tensor, file
