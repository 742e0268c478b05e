"""The model's vocabulary as llguidance sees it (an ``LLTokenizer``), built once per tokenizer."""

from __future__ import annotations

import re
import threading
from typing import Sequence

from ..stringtable import StringTable
from ..tokenizer import CONTROL, UNKNOWN, UNUSED, USER_DEFINED

# User-defined pieces that are markup rather than text (Gemma 4's <|channel>, <|"|>, <|tool_call>, Gemma 3's
# <start_of_image>, [multimodal]): a grammar names them explicitly; free text in a grammar never produces them.
_MARKUP = re.compile(r"^(<[^<>\s]+>|\[[a-z_]+\])$")
_lock = threading.Lock()


class _VocabularyView:
    """What llguidance's TokenizerWrapper protocol asks of a tokenizer: the bytes of every token, the special
    ids, BOS/EOS, and a text -> ids function (it tokenizes forced text with it)."""

    def __init__(self, tokenizer) -> None:
        n = tokenizer.vocab_size
        types = tokenizer.types
        self.special_token_ids = [i for i in range(n) if types[i] in (CONTROL, UNKNOWN, UNUSED)
                                  or (types[i] == USER_DEFINED and _MARKUP.match(tokenizer.pieces[i]))]
        # Special tokens go by their names; llguidance keeps them apart from text by id.
        self.tokens: Sequence[bytes] = _piece_bytes(tokenizer)
        for i, raw in getattr(tokenizer, "_byte_pieces", {}).items():
            self.tokens[i] = raw
        for i in self.special_token_ids:
            self.tokens[i] = tokenizer.pieces[i].encode("utf-8")
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.is_tokenizer_wrapper = True
        self._tokenizer = tokenizer
        self._byte_ids = {raw[0]: i for i, raw in getattr(tokenizer, "_byte_pieces", {}).items() if len(raw) == 1}

    def __call__(self, text: str | bytes) -> list[int]:
        """Token ids whose bytes spell ``text`` (llguidance relies on it when the grammar forces text)."""
        raw = text if isinstance(text, bytes) else text.encode("utf-8")
        ids = self._tokenizer.encode(raw.decode("utf-8", errors="replace"))
        if b"".join(self.tokens[i] for i in ids) == raw or not all(b in self._byte_ids for b in raw):
            return ids
        # The encoding does not spell the bytes back (a vocabulary without a "▁" piece byte-encodes spaces as
        # U+2581's bytes): byte pieces do.
        return [self._byte_ids[b] for b in raw]


def _piece_bytes(tokenizer) -> list[bytes]:
    """Every piece's bytes with SentencePiece's "▁" as a space (byte pieces are set apart by the caller): cut
    from the vocabulary's one blob when it is a StringTable (0.2 s for 262k pieces instead of 1.5)."""
    pieces = tokenizer.pieces
    if isinstance(pieces, StringTable):
        blob, offsets = pieces.blob, pieces.offsets.tolist()
        raw = [blob[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
        return [b.replace(b"\xe2\x96\x81", b" ") for b in raw]
    return [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]


def ll_tokenizer(tokenizer):
    """The ``llguidance.LLTokenizer`` of a gemmakit tokenizer (built on first use, ~1 s for 262k pieces, then
    kept on the tokenizer)."""
    import llguidance

    with _lock:
        cached = getattr(tokenizer, "_llguidance", None)
        if cached is None:
            cached = llguidance.LLTokenizer(_VocabularyView(tokenizer), n_vocab=tokenizer.vocab_size)
            tokenizer._llguidance = cached
        return cached
