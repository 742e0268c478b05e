"""Bad model files: each raises a named gemmakit error that names the file and the problem, quickly."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

import gemmakit
from gemmakit.errors import (
    CorruptFileError,
    GemmakitError,
    ModelNotFoundError,
    NotGGUFError,
    TruncatedFileError,
    UnsupportedModelError,
    WeightError,
)
from gemmakit.weights.gguf import GGUFFile
from helpers import TINY, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def expect(path: Path, exc: type[Exception], *fragments: str) -> GemmakitError:
    start = time.perf_counter()
    with pytest.raises(exc) as info:
        gemmakit.load(path)
    assert time.perf_counter() - start < 5, "a bad file must fail fast"
    message = str(info.value)
    assert isinstance(info.value, GemmakitError)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def test_tiny_file_loads_and_generates(tiny: Path) -> None:
    llm = gemmakit.load(tiny)
    assert llm.config.num_hidden_layers == TINY["layers"]
    assert llm.config.sliding_window == TINY["window"]
    out = llm.generate("ab", max_tokens=4, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_missing_file(tmp_path: Path) -> None:
    expect(tmp_path / "nope.gguf", ModelNotFoundError, "no such file")


def test_directory(tmp_path: Path) -> None:
    expect(tmp_path, ModelNotFoundError, "directory")


def test_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "model.gguf"
    p.write_text("this is not a model file at all")
    expect(p, NotGGUFError, "not a GGUF file", "b'this'")


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    expect(p, NotGGUFError, "not a GGUF file")


@pytest.mark.parametrize("keep,fragment", [(6, "file ends while reading version"), (30, "more than the"),
                                           (200, "more than the"), (1500, "file ends while reading"), (5000, "file ends while reading")])
def test_truncated_header(tiny: Path, tmp_path: Path, keep: int, fragment: str) -> None:
    p = tmp_path / "cut.gguf"
    p.write_bytes(tiny.read_bytes()[:keep])
    expect(p, TruncatedFileError, fragment)


def test_truncated_tensor_data(tiny: Path, tmp_path: Path) -> None:
    p = tmp_path / "cut.gguf"
    data = tiny.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    expect(p, TruncatedFileError, "truncated", "blk.1.")


def test_unsupported_version(tiny: Path, tmp_path: Path) -> None:
    p = tmp_path / "v9.gguf"
    data = bytearray(tiny.read_bytes())
    data[4:8] = struct.pack("<I", 9)
    p.write_bytes(bytes(data))
    expect(p, UnsupportedModelError, "version 9")


@pytest.mark.parametrize("field_offset,what", [(8, "tensors"), (16, "metadata entries")])
def test_impossible_counts(tiny: Path, tmp_path: Path, field_offset: int, what: str) -> None:
    p = tmp_path / "huge.gguf"
    data = bytearray(tiny.read_bytes())
    data[field_offset : field_offset + 8] = struct.pack("<Q", 1 << 60)
    p.write_bytes(bytes(data))
    expect(p, CorruptFileError, what, "more than any model has")


def test_impossible_string_length(tiny: Path, tmp_path: Path) -> None:
    p = tmp_path / "badlen.gguf"
    data = bytearray(tiny.read_bytes())
    data[24:32] = struct.pack("<Q", 1 << 62)  # length of the first metadata key
    p.write_bytes(bytes(data))
    expect(p, CorruptFileError, "metadata key", "length")


def test_impossible_array_length(tiny: Path, tmp_path: Path) -> None:
    p = tmp_path / "badarray.gguf"
    data = bytearray(tiny.read_bytes())
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key) + 4 + 4  # key, value type (ARRAY), element type (STRING)
    data[at : at + 8] = struct.pack("<Q", 1 << 61)
    p.write_bytes(bytes(data))
    expect(p, TruncatedFileError, "tokenizer.ggml.tokens")


def _tokens_array(data: bytearray) -> tuple[int, int]:
    """Offset of the first string of tokenizer.ggml.tokens (its 8-byte length) and the array's length."""
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key) + 4 + 4
    (count,) = struct.unpack_from("<Q", data, at)
    return at + 8, count


@pytest.mark.parametrize("case", ["invalid byte", "character split across two pieces"])
def test_vocabulary_piece_not_utf8(tiny: Path, tmp_path: Path, case: str) -> None:
    p = tmp_path / "badutf8.gguf"
    data = bytearray(tiny.read_bytes())
    pos, count = _tokens_array(data)
    offsets = []  # (length field offset, text offset, length) of each piece
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", data, pos)
        offsets.append((pos, pos + 8, n))
        pos += 8 + n
    # Pieces 5 and 6 (ordinary pieces of one byte or more in the tiny vocabulary).
    (_, text5, n5), (_, text6, n6) = offsets[5], offsets[6]
    assert n5 >= 1 and n6 >= 1
    if case == "invalid byte":
        data[text6] = 0xFF
    else:
        # The blob of all pieces stays valid UTF-8 ("\u00e9" = C3 A9), but piece 5 ends in the middle of it
        # and piece 6 starts with its continuation byte: each piece on its own is invalid.
        data[text5 + n5 - 1] = 0xC3
        data[text6] = 0xA9
    p.write_bytes(bytes(data))
    expect(p, CorruptFileError, "tokenizer.ggml.tokens", "not valid UTF-8")


def test_unknown_value_type(tiny: Path, tmp_path: Path) -> None:
    p = tmp_path / "badtype.gguf"
    data = bytearray(tiny.read_bytes())
    key = b"general.architecture"
    at = data.index(key) + len(key)
    data[at : at + 4] = struct.pack("<I", 77)
    p.write_bytes(bytes(data))
    expect(p, CorruptFileError, "unknown value type 77")


def test_unsupported_architecture(tmp_path: Path) -> None:
    p = write_tiny_gguf(tmp_path / "llama.gguf", arch="llama")
    expect(p, UnsupportedModelError, "architecture 'llama'")


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    # IQ4_NL: 32-element blocks of 18 bytes; raw bytes given with their byte shape.
    raw = np.zeros((TINY["hidden"], TINY["hidden"] // 32 * 18), dtype=np.uint8)
    p = write_tiny_gguf(
        tmp_path / "iq.gguf",
        extra={"output_norm.weight": np.ones(TINY["hidden"], np.float32), "blk.0.ffn_norm.weight": raw},
        raw_types={"blk.0.ffn_norm.weight": GGMLQuantizationType.IQ4_NL},
    )
    # The tensor is also misshaped for a norm; either way the error names it.
    with pytest.raises((UnsupportedModelError, WeightError), match="blk.0.ffn_norm.weight"):
        gemmakit.load(p)


def test_unsupported_type_on_right_shape(tmp_path: Path) -> None:
    E, F = TINY["hidden"], TINY["ffn"]
    raw = np.zeros((F, E // 32 * 18), dtype=np.uint8)  # (ffn, hidden) in IQ4_NL blocks
    p = write_tiny_gguf(
        tmp_path / "iq2.gguf",
        extra={"blk.0.ffn_up.weight": raw},
        raw_types={"blk.0.ffn_up.weight": GGMLQuantizationType.IQ4_NL},
    )
    expect(p, UnsupportedModelError, "blk.0.ffn_up.weight", "IQ4_NL")


def test_missing_tensor(tmp_path: Path) -> None:
    p = write_tiny_gguf(tmp_path / "missing.gguf", drop=("blk.1.ffn_down.weight",))
    expect(p, WeightError, "missing", "layers.1.mlp.down_proj.weight")


def test_misshaped_tensor(tmp_path: Path) -> None:
    p = write_tiny_gguf(tmp_path / "shape.gguf", reshape={"blk.0.attn_q.weight": (TINY["hidden"], 7 * 32)})
    expect(p, WeightError, "blk.0.attn_q.weight", "expected")


def test_unexpected_tensor(tmp_path: Path) -> None:
    p = write_tiny_gguf(tmp_path / "extra.gguf", extra={"blk.0.surprise.weight": np.zeros(4, np.float32)})
    expect(p, WeightError, "unexpected tensor", "blk.0.surprise.weight")


def test_parser_reads_metadata_and_views(tiny: Path) -> None:
    g = GGUFFile(tiny)
    assert g.architecture == "gemma3"
    assert g.metadata["gemma3.embedding_length"] == TINY["hidden"]
    info = g.tensors["blk.0.attn_q.weight"]
    assert info.shape == (TINY["heads"] * TINY["head_dim"], TINY["hidden"])
    raw = g.tensor_bytes("blk.0.attn_q.weight")
    assert raw.shape == (TINY["heads"] * TINY["head_dim"], TINY["hidden"] * 4)
    assert torch.from_numpy(np.array(raw)).view(torch.float32).shape == info.shape
