"""Gemma's SentencePiece tokenizer, rebuilt from a GGUF vocabulary.

The GGUF holds the original SentencePiece pieces, scores and piece types. We assemble them into a
SentencePiece ``ModelProto`` (BPE, byte fallback, identity normalizer, no dummy prefix) and let the
`sentencepiece` library encode: it matches user-defined pieces (runs of spaces and newlines, HTML tags)
longest-first and keeps them whole, merges the rest by piece score, and falls back to ``<0xXX>`` byte pieces.
That is the split llama.cpp makes (checked against its ids in tests/data/tokenizer_golden.json).

Control tokens (``<start_of_turn>``, ``<eos>`` ...) are never produced from text unless asked with
``parse_special=True``; the chat template inserts them by id.
"""

from __future__ import annotations

import codecs
import re
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from .errors import CorruptFileError
from .stringtable import StringTable, as_string_table

# GGUF token types (llama.cpp) use the same numbering as SentencePiece piece types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>$")


def _ids_of_types(types: Sequence[int], wanted: tuple[int, ...]) -> list[int]:
    """Ids whose piece type is one of ``wanted``, found without a Python loop over a 262k vocabulary (its
    pieces are a string table: visiting each one costs ~0.6 s of every load)."""
    return np.flatnonzero(np.isin(np.asarray(types), wanted)).tolist()


class _Vocabulary:
    """Id <-> piece tables and decoding, shared by the GGUF and tokenizer.json tokenizers."""

    pieces: Sequence[str]
    types: list[int]
    _id_of: dict[str, int]
    _byte_pieces: dict[int, bytes]
    bos_id: int
    eos_id: int

    def _index(self) -> None:
        # Byte pieces stand for their byte; every other piece for its text with the SentencePiece space restored,
        # computed when asked (a table of 262k bytes objects would cost ~13 MB).
        self._byte_pieces = {i: _piece_bytes(self.pieces[i], BYTE) for i in _ids_of_types(self.types, (BYTE,))}

    def _index_special_pieces(self, never_from_text: frozenset[str] = frozenset()) -> None:
        """Pieces matched in raw text before the BPE runs, longest first (llama.cpp's special-token partition):
        user-defined ones always (except ``never_from_text``), control and unknown ones only when parsing
        special tokens."""
        special = [(self.pieces[i], i, self.types[i]) for i in _ids_of_types(self.types, (USER_DEFINED, CONTROL, UNKNOWN))]
        special = [(p, i, t) for p, i, t in special if p]

        def longest_first(found: list[tuple[str, int]]) -> list[tuple[str, int]]:
            return sorted(found, key=lambda pi: len(pi[0].encode("utf-8")), reverse=True)

        self._user_defined = longest_first(
            [(p, i) for p, i, t in special if t == USER_DEFINED and p not in never_from_text])
        self._with_special = longest_first([(p, i) for p, i, _ in special])

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def token_id(self, piece: str) -> int:
        """Id of a piece by its text (e.g. ``"<end_of_turn>"``); KeyError if absent."""
        i = self._lookup(piece)
        if i is None:
            raise KeyError(piece)
        return i

    def has_piece(self, piece: str) -> bool:
        return self._lookup(piece) is not None

    def _lookup(self, piece: str) -> int | None:
        i = self._id_of.get(piece)
        return i

    def is_control(self, token_id: int) -> bool:
        return self.types[token_id] == CONTROL

    def token_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes a token stands for (control tokens: their text, or nothing with ``skip_special``)."""
        if skip_special and self.types[token_id] == CONTROL:
            return b""
        raw = self._byte_pieces.get(token_id)
        if raw is not None:
            return raw
        return self._piece_utf8(token_id).replace(b"\xe2\x96\x81", b" ")  # U+2581 -> space

    def _piece_utf8(self, token_id: int) -> bytes:
        pieces = self.pieces
        if isinstance(pieces, StringTable):
            return pieces.bytes_at(token_id)
        return pieces[token_id].encode("utf-8")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for ``ids``: the exact inverse of ``encode`` (invalid UTF-8 becomes U+FFFD).

        ``skip_special_tokens`` leaves out control tokens (``<bos>``, ``<end_of_turn>``, ...), as in transformers.
        """
        return b"".join(self.token_bytes(int(i), skip_special_tokens) for i in ids).decode("utf-8", errors="replace")


class Tokenizer(_Vocabulary):
    """Text <-> token ids for a Gemma vocabulary.

    Args:
        pieces: the vocabulary, id order.
        scores: SentencePiece scores (merge priority), one per piece.
        types: piece types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
        bos_id, eos_id, pad_id, unk_id: special ids.
        add_bos: whether :meth:`encode` prepends BOS by default for raw prompts.
    """

    def __init__(
        self,
        pieces: Sequence[str],
        scores: Sequence[float],
        types: Sequence[int],
        bos_id: int = 2,
        eos_id: int = 1,
        pad_id: int = 0,
        unk_id: int = 3,
        add_bos: bool = True,
    ) -> None:
        if not (len(pieces) == len(scores) == len(types)):
            raise CorruptFileError("tokenizer pieces, scores and types differ in length")
        self.pieces = as_string_table(pieces)
        self.types = types.tolist() if hasattr(types, "tolist") else [int(t) for t in types]
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = add_bos
        self._sp = spm.SentencePieceProcessor(model_proto=_model_proto(self.pieces, scores, self.types, unk_id))
        self._id_of = {}  # SentencePiece answers piece lookups (saves a 262k-entry dict)
        self._index()
        self._index_special_pieces()

    def _lookup(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        # Unknown pieces map to the unk id; only "<unk>" itself legitimately does.
        return i if (i != self.unk_id or piece == self.pieces[self.unk_id]) and self.pieces[i] == piece else None

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids for ``text``.

        Args:
            add_bos: prepend the BOS id.
            parse_special: turn literal control-token strings (``<start_of_turn>``) into their ids; by default
                they are encoded as ordinary text, so user text can never forge a control token.
        """
        ids = [self.bos_id] if add_bos else []
        fragments = _partition(text, self._with_special if parse_special else self._user_defined)
        texts = [f for f in fragments if isinstance(f, str)]
        encoded = iter(self._sp.encode(texts)) if texts else iter(())
        for fragment in fragments:
            if isinstance(fragment, str):
                ids.extend(next(encoded))
            else:
                ids.append(fragment)
        return ids

    @classmethod
    def from_gguf_metadata(cls, meta: dict, path: str = "model") -> "Tokenizer | BPETokenizer":
        """Build from llama.cpp ``tokenizer.ggml.*`` keys: model ``llama`` (SentencePiece, Gemma 1-3) or
        ``gemma4`` (BPE with merges, see :class:`BPETokenizer`)."""
        model = meta.get("tokenizer.ggml.model")
        if model not in ("llama", "gemma4"):
            from .errors import UnsupportedModelError

            raise UnsupportedModelError(
                f"{path}: tokenizer model {model!r} is not supported (Gemma GGUFs use 'llama' or 'gemma4')"
            )
        pieces = meta.get("tokenizer.ggml.tokens")
        scores = meta.get("tokenizer.ggml.scores")
        types = meta.get("tokenizer.ggml.token_type")
        if pieces is None or types is None or (scores is None and model == "llama"):
            raise CorruptFileError(f"{path}: tokenizer.ggml.tokens, scores and token_type are all required")
        ids = dict(
            bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
            eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 1)),
            pad_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)),
            unk_id=int(meta.get("tokenizer.ggml.unknown_token_id", 3)),
        )
        if model == "gemma4":
            merges = meta.get("tokenizer.ggml.merges")
            if merges is None:
                raise CorruptFileError(f"{path}: a 'gemma4' vocabulary needs tokenizer.ggml.merges")
            return BPETokenizer(pieces, types, merges, path=path, **ids)
        return cls(pieces, scores, types, add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)), **ids)


# Gemma 4 markers that llama.cpp's converter re-types from control to user-defined so they stay visible in
# decoded text (our output parser reads them there). They are still never cut out of user text.
GEMMA4_VISIBLE_MARKERS = frozenset(
    {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'}
)
_LINES_AND_NEWLINES = re.compile(r"[^\n]+|\n+")


class BPETokenizer(_Vocabulary):
    """Gemma 4's GGUF vocabulary (``tokenizer.ggml.model = "gemma4"``), encoded the way llama.cpp does.

    SentencePiece-style BPE on raw UTF-8: spaces become U+2581, the text is cut only into runs of newlines and
    runs of everything else (no word pre-split), a newline run that is itself a piece is taken whole, and the
    rest is merged pair by pair in merge-rank order (leftmost first on ties). Characters no piece covers fall
    back to ``<0xXX>`` byte pieces. The merging runs in the `tokenizers` library's BPE model.

    Args:
        pieces: the vocabulary, id order.
        types: piece types (same numbering as :class:`Tokenizer`).
        merges: ``"left right"`` strings, highest priority first.
    """

    def __init__(
        self,
        pieces: Sequence[str],
        types: Sequence[int],
        merges: Sequence[str],
        bos_id: int = 2,
        eos_id: int = 1,
        pad_id: int = 0,
        unk_id: int = 3,
        path: str = "model",
    ) -> None:
        from tokenizers import models

        if len(pieces) != len(types):
            raise CorruptFileError(f"{path}: tokenizer pieces and token types differ in length")
        self.pieces = list(pieces)
        self.types = types.tolist() if hasattr(types, "tolist") else [int(t) for t in types]
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = True  # llama.cpp forces BOS for Gemma 4 whatever the file says
        self._id_of = {p: i for i, p in enumerate(self.pieces)}
        self._index()
        pairs = []
        for rank, merge in enumerate(merges):
            cut = merge.find(" ", 1)
            left, right = (merge[:cut], merge[cut + 1 :]) if cut > 0 else (merge, "")
            if not (left in self._id_of and right in self._id_of and left + right in self._id_of):
                raise CorruptFileError(
                    f"{path}: tokenizer merge {rank} {merge!r} does not join two pieces into a third one"
                )
            pairs.append((left, right))
        self._bpe = models.BPE(vocab=self._id_of, merges=pairs, byte_fallback=True)
        self._newline_runs = {p: i for p, i in self._id_of.items() if p and not p.strip("\n")}
        self._index_special_pieces(never_from_text=GEMMA4_VISIBLE_MARKERS)

    def _encode_text(self, text: str, out: list[int]) -> None:
        for run in _LINES_AND_NEWLINES.findall(text.replace(" ", "\u2581")):
            whole = self._newline_runs.get(run)
            if whole is not None:
                out.append(whole)
            else:
                out.extend(t.id for t in self._bpe.tokenize(run))

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        """Token ids for ``text``; same arguments as :meth:`Tokenizer.encode`."""
        ids = [self.bos_id] if add_bos else []
        for fragment in _partition(text, self._with_special if parse_special else self._user_defined):
            if isinstance(fragment, str):
                self._encode_text(fragment, ids)
            else:
                ids.append(fragment)
        return ids


def _partition(text: str, specials: list[tuple[str, int]]) -> list[str | int]:
    """Split ``text`` around special pieces, as llama.cpp does: for each piece, longest first, cut every
    occurrence out of the fragments that are still text. Returns text fragments and piece ids in order."""
    fragments: list[str | int] = [text] if text else []
    for piece, piece_id in specials:
        if not any(isinstance(f, str) and piece in f for f in fragments):
            continue
        out: list[str | int] = []
        for f in fragments:
            if not isinstance(f, str) or piece not in f:
                out.append(f)
                continue
            parts = f.split(piece)
            for k, part in enumerate(parts):
                if k:
                    out.append(piece_id)
                if part:
                    out.append(part)
        fragments = out
    return fragments


def _piece_bytes(piece: str, ptype: int) -> bytes:
    if ptype == BYTE:
        m = BYTE_PIECE.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


_ONE_BYTE = [bytes([i]) for i in range(128)]


def _varint(n: int) -> bytes:
    if n < 128:
        return _ONE_BYTE[n]
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pieces_wire(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> bytes:
    """ModelProto.pieces (field 1, repeated SentencePiece{piece=1, score=2, type=3}) in protobuf wire format,
    assembled with numpy: the protobuf Python API takes ~0.3 s for a 262k vocabulary, a Python loop ~0.4 s."""
    table = as_string_table(pieces)
    lengths = table.lengths()
    if lengths.max(initial=0) >= 120:  # records then need multi-byte varints: take the simple path
        return _pieces_wire_slow([table.bytes_at(i) for i in range(len(table))], scores, types)
    # User-defined pieces were cut out of the text already; inside fragments they take part in merges like any
    # piece (llama.cpp's merge looks up every piece by text).
    kinds = np.asarray(types, dtype=np.int64)
    kinds = np.where(kinds == USER_DEFINED, NORMAL, kinds).astype(np.uint8)
    record = lengths + 11  # 0x0a, body length, then the body: 0x0a n text, 0x15 float32, 0x18 type
    starts = np.concatenate([[0], np.cumsum(record)[:-1]])
    out = np.zeros(int(record.sum()), dtype=np.uint8)
    out[starts] = 0x0A
    out[starts + 1] = (lengths + 9).astype(np.uint8)
    out[starts + 2] = 0x0A
    out[starts + 3] = lengths.astype(np.uint8)
    # Text byte j of the blob (of piece i) goes to j + 4 + 11 * i: int32 indices keep this temporary small.
    text_bytes = np.frombuffer(table.blob, dtype=np.uint8)
    text_pos = np.repeat(np.arange(4, 4 + 11 * len(table), 11, dtype=np.int32), lengths)
    text_pos += np.arange(len(text_bytes), dtype=np.int32)
    out[text_pos] = text_bytes
    del text_pos
    tail = starts + 4 + lengths
    out[tail] = 0x15
    score_bytes = np.asarray(scores, dtype="<f4").view(np.uint8).reshape(-1, 4)
    for k in range(4):
        out[tail + 1 + k] = score_bytes[:, k]
    out[tail + 5] = 0x18
    out[tail + 6] = kinds
    return out.tobytes()


def _pieces_wire_slow(texts: Sequence[bytes], scores: Sequence[float], types: Sequence[int]) -> bytes:
    import struct

    pack = struct.Struct("<f").pack
    parts = []
    for text, score, ptype in zip(texts, scores, types):
        kind = NORMAL if ptype == USER_DEFINED else ptype
        body = b"\x0a" + _varint(len(text)) + text + b"\x15" + pack(float(score)) + b"\x18" + _varint(kind)
        parts.append(b"\x0a" + _varint(len(body)) + body)
    return b"".join(parts)


def _model_proto(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], unk_id: int) -> bytes:
    proto = sp_pb2.ModelProto()
    ts = proto.trainer_spec
    ts.model_type = sp_pb2.TrainerSpec.BPE
    ts.vocab_size = len(pieces)
    ts.byte_fallback = True
    ts.unk_id = unk_id
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    # Concatenated serializations merge: the specs from the API, the 262k pieces written directly.
    return _pieces_wire(pieces, scores, types) + proto.SerializeToString()


class StreamDecoder:
    """Turns token ids into text deltas that never end in half a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._dec.decode(self._tok.token_bytes(token_id, self._skip))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class HFTokenizer(_Vocabulary):
    """A Hugging Face ``tokenizer.json`` (Gemma: BPE with byte fallback) behind the same interface as
    :class:`Tokenizer`. Encoding runs in the `tokenizers` library; control tokens in text stay text unless
    ``parse_special`` is set."""

    def __init__(self, tok, bos_id: int, eos_id: int, pad_id: int, unk_id: int) -> None:
        self._tok = tok
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = True
        vocab = tok.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1
        self.pieces = [""] * size
        for piece, i in vocab.items():
            self.pieces[i] = piece
        special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        special |= {self.pieces[i] for i in (bos_id, eos_id, pad_id) if 0 <= i < size}
        self.types = [_hf_piece_type(p, special) for p in self.pieces]
        self._id_of = vocab
        self._index()

    @classmethod
    def from_folder(cls, folder) -> "HFTokenizer | None":
        """The folder's tokenizer.json, or None if it has none."""
        from pathlib import Path

        from tokenizers import Tokenizer as _Tok

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            tok = _Tok.from_file(str(path))
        except Exception as exc:
            raise CorruptFileError(f"{path}: not a readable tokenizer.json ({exc})") from None
        vocab = tok.get_vocab(with_added_tokens=True)

        def id_of(piece: str, default: int) -> int:
            return vocab.get(piece, default)

        return cls(tok, id_of("<bos>", 2), id_of("<eos>", 1), id_of("<pad>", 0), id_of("<unk>", 3))

    def encode(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        self._tok.encode_special_tokens = not parse_special
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + list(ids)


def _hf_piece_type(piece: str, special: set[str]) -> int:
    # Gemma 4's channel / tool-call markers stay visible in decoded text, as in llama.cpp's GGUF conversion.
    if piece in GEMMA4_VISIBLE_MARKERS:
        return USER_DEFINED
    if piece in special:
        return CONTROL
    return BYTE if BYTE_PIECE.match(piece) else NORMAL
