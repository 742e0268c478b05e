"""The model's vocabulary as llguidance sees it (an ``LLTokenizer``), built once per tokenizer."""

from __future__ import annotations

import re
import threading
from typing import Sequence

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
        self.special_token_ids = [i for i in range(n) if _is_special(tokenizer, i)]
        special = set(self.special_token_ids)
        # Special tokens go by their names; llguidance keeps them apart from text by id.
        self.tokens: Sequence[bytes] = [tokenizer.pieces[i].encode("utf-8") if i in special
                                        else tokenizer.token_bytes(i) for i in range(n)]
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


def _is_special(tokenizer, token_id: int) -> bool:
    kind = tokenizer.types[token_id]
    if kind in (CONTROL, UNKNOWN, UNUSED):
        return True
    return kind == USER_DEFINED and bool(_MARKUP.match(tokenizer.pieces[token_id]))


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
