"""A Hugging Face folder's tokenizer as llama.cpp's ``tokenizer.ggml.*`` keys.

Gemma 1-3 GGUFs carry a SentencePiece vocabulary (``tokenizer.ggml.model = "llama"``: pieces, scores, types),
which llama.cpp's converter reads from the folder's ``tokenizer.model``; Gemma 4 GGUFs carry BPE pieces and
merges (``"gemma4"``), read from ``tokenizer.json``. The piece types follow the converter: control pieces,
``<0xXX>`` byte pieces, and Gemma 4's channel / tool-call markers as user-defined so they stay visible in text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptFileError, InvalidParameterError
from ..tokenizer import BYTE, CONTROL, GEMMA4_VISIBLE_MARKERS, NORMAL, UNKNOWN, USER_DEFINED, BYTE_PIECE

MAX_TOKENIZER_BYTES = 256 * 2**20  # a real Gemma tokenizer.json is ~33 MB


@dataclass
class Vocabulary:
    """What the GGUF's tokenizer keys hold."""

    model: str  # "llama" (SentencePiece) or "gemma4" (BPE with merges)
    pieces: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, pad, unk -> id

    def keys(self) -> dict[str, Any]:
        """``tokenizer.ggml.*`` key -> value."""
        out: dict[str, Any] = {"tokenizer.ggml.model": self.model, "tokenizer.ggml.tokens": self.pieces,
                               "tokenizer.ggml.scores": self.scores, "tokenizer.ggml.token_type": self.types}
        if self.merges:
            out["tokenizer.ggml.merges"] = self.merges
        for name, token_id in self.special.items():
            out[f"tokenizer.ggml.{'padding' if name == 'pad' else name}_token_id"] = token_id
        out["tokenizer.ggml.add_bos_token"] = True
        out["tokenizer.ggml.add_eos_token"] = False
        out["tokenizer.ggml.add_space_prefix"] = False
        return out


def read_vocabulary(folder: Path, architecture: str) -> Vocabulary:
    """The folder's tokenizer in the form llama.cpp's converter writes for ``architecture``.

    Raises:
        InvalidParameterError: the folder lacks the tokenizer file that architecture's GGUF needs.
        CorruptFileError: the file cannot be read.
    """
    if architecture == "gemma4":
        return _from_tokenizer_json(folder / "tokenizer.json")
    return _from_sentencepiece(folder / "tokenizer.model")


def _special_ids(pieces: list[str]) -> dict[str, int]:
    """Gemma's fixed special pieces: pad 0, eos 1, bos 2, unk 3 (looked up, not assumed)."""
    index = {p: i for i, p in enumerate(pieces) if p.startswith("<") and p.endswith(">")}
    wanted = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"}
    return {name: index[piece] for name, piece in wanted.items() if piece in index}


def _from_sentencepiece(path: Path) -> Vocabulary:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    if not path.is_file():
        raise InvalidParameterError(f"{path.parent}: no tokenizer.model (a Gemma 1-3 GGUF holds the SentencePiece "
                                    "vocabulary, which llama.cpp reads from that file)")
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(_read_limited(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise CorruptFileError(f"{path}: not a SentencePiece model ({exc})") from None
    if not proto.pieces:
        raise CorruptFileError(f"{path}: the SentencePiece model has no pieces")
    pieces = [p.piece for p in proto.pieces]
    # SentencePiece's piece types are GGUF's token types (1 normal ... 6 byte).
    return Vocabulary("llama", pieces, [float(p.score) for p in proto.pieces], [int(p.type) for p in proto.pieces],
                      special=_special_ids(pieces))


def _from_tokenizer_json(path: Path) -> Vocabulary:
    if not path.is_file():
        raise InvalidParameterError(f"{path.parent}: no tokenizer.json (a Gemma 4 GGUF holds its BPE pieces and "
                                    "merges, read from that file)")
    try:
        data = json.loads(_read_limited(path))
        model = data["model"]
        vocab: dict[str, int] = model["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"{path}: not a BPE tokenizer.json ({exc})") from None
    added = {t["id"]: t for t in data.get("added_tokens") or [] if isinstance(t, dict) and "id" in t}
    size = max([*vocab.values(), *added]) + 1
    pieces = [""] * size
    for piece, i in vocab.items():
        pieces[i] = piece
    for i, token in added.items():
        pieces[i] = token["content"]
    if "" in pieces:
        raise CorruptFileError(f"{path}: token ids are not contiguous (id {pieces.index('')} has no piece)")
    special = _special_ids(pieces)
    control = {t["content"] for t in added.values() if t.get("special")} | {pieces[i] for i in special.values()}
    types = [_piece_type(p, control, p == "<unk>") for p in pieces]
    return Vocabulary("gemma4", pieces, [0.0] * size, types, merges, special)


def _piece_type(piece: str, control: set[str], unknown: bool) -> int:
    if unknown:
        return UNKNOWN
    if piece in GEMMA4_VISIBLE_MARKERS:
        return USER_DEFINED
    if piece in control:
        return CONTROL
    return BYTE if BYTE_PIECE.match(piece) else NORMAL


def _read_limited(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_TOKENIZER_BYTES:
        raise CorruptFileError(f"{path}: {size / 2**20:.0f} MiB, more than a tokenizer file can be "
                               f"({MAX_TOKENIZER_BYTES / 2**20:.0f} MiB)")
    return path.read_bytes()
