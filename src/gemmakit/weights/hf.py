"""Hugging Face checkpoints: config.json plus (sharded) safetensors, memory-mapped (or read row by row when the
weights are quantized while loading)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
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


# -- reading rows without a memory map (quantize-at-load) -----------------------------------------------------

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor of a safetensors file lies: read it, or rows of it, with :func:`read_rows`."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of its first element

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    def part(self, index: int) -> "TensorEntry":
        """Element ``index`` along the first dimension, as an entry of its own (one expert of a stack)."""
        size = self.nbytes // self.shape[0]
        return TensorEntry(f"{self.name}[{index}]", self.dtype, self.shape[1:], self.file, self.offset + index * size)


def _entries_of(file: Path) -> list[TensorEntry]:
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                raise CorruptFileError(f"{file}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise CorruptFileError(f"{file}: not a readable safetensors file ({exc})") from None
    entries = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            entry = TensorEntry(name, _SAFETENSORS_DTYPES[meta["dtype"]], tuple(int(d) for d in meta["shape"]), file,
                                0)
            begin, end = (int(v) for v in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"{file}: tensor {name!r}: unreadable entry or unsupported dtype") from None
        if begin < 0 or end - begin != entry.nbytes or 8 + n + end > size:
            raise CorruptFileError(f"{file}: tensor {name!r}: its data offsets do not match its shape or the file")
        entries.append(TensorEntry(name, entry.dtype, entry.shape, file, 8 + n + begin))
    return entries


def tensor_entries(files: list[Path]) -> Iterator[TensorEntry]:
    """Every tensor of the shards, located from the headers alone (no data read, nothing mapped)."""
    seen: set[str] = set()
    for file in files:
        for entry in _entries_of(file):
            if entry.name in seen:
                raise CorruptFileError(f"{file}: tensor {entry.name!r} appears in more than one shard")
            seen.add(entry.name)
            yield entry


def read_rows(entry: TensorEntry, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) of a tensor along its first dimension (all of it by default), read with plain file
    reads: the pages pass through the page cache, not into this process's resident memory as a map's would."""
    lead = entry.shape[0] if entry.shape else 1
    stop = lead if stop is None else stop
    per_row = entry.nbytes // lead if lead else 0
    buffer = bytearray((stop - start) * per_row)
    with open(entry.file, "rb") as f:
        f.seek(entry.offset + start * per_row)
        if f.readinto(buffer) != len(buffer):
            raise CorruptFileError(f"{entry.file}: tensor {entry.name!r} is cut short")
    shape = (stop - start, *entry.shape[1:]) if entry.shape else ()
    if not buffer:
        return torch.empty(shape, dtype=entry.dtype)
    return torch.frombuffer(buffer, dtype=entry.dtype).reshape(shape)
