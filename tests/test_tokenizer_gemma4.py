"""Gemma 4 GGUF vocabularies (``tokenizer.ggml.model = "gemma4"``) against llama.cpp's own ids.

tests/data/gemma4_tokenizer_golden.json holds a Gemma 4-shaped vocabulary (BPE merges, byte pieces, Gemma 4
control and marker pieces, newline-run pieces) and the ids llama-cpp-python 0.3.36 gave for 72 texts
(scripts/make_gemma4_tokenizer_golden.py). The test writes the vocabulary as a GGUF and reads it back the
way `gemmakit.load` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemmakit.errors import CorruptFileError
from gemmakit.tokenizer import GEMMA4_VISIBLE_MARKERS, BPETokenizer, Tokenizer
from gemmakit.weights.gguf import GGUFFile

GOLDEN = json.loads((Path(__file__).parent / "data" / "gemma4_tokenizer_golden.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> BPETokenizer:
    from gguf import GGUFWriter

    path = tmp_path_factory.mktemp("g4") / "vocab.gguf"
    w = GGUFWriter(str(path), "gemma4")
    w.add_tokenizer_model("gemma4")
    w.add_token_list(GOLDEN["pieces"])
    w.add_token_scores([0.0] * len(GOLDEN["pieces"]))
    w.add_token_types(GOLDEN["types"])
    w.add_token_merges(GOLDEN["merges"])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_add_bos_token(False)  # llama.cpp forces BOS on for Gemma 4 anyway
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata, str(path))
    assert isinstance(tok, BPETokenizer) and tok.add_bos
    return tok


def _has_marker(text: str) -> bool:
    return any(m in text for m in GEMMA4_VISIBLE_MARKERS)


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: repr(c["text"][:30]))
def test_ids_match_llamacpp(tokenizer, case) -> None:
    text = case["text"]
    assert tokenizer.encode(text, parse_special=True) == case["ids_special"]
    if not _has_marker(text):
        assert tokenizer.encode(text) == case["ids"]
    if "\u2581" not in text:  # a literal U+2581 encodes like a space (as in llama.cpp) and decodes as one
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_marker_text_in_user_input_stays_text(tokenizer) -> None:
    """llama.cpp cuts Gemma 4's visible markers (user-defined pieces) out of any text, so a user who types
    ``<|tool_call>`` forges a tool call. gemmakit only does so with parse_special."""
    marker_ids = {tokenizer.token_id(m) for m in GEMMA4_VISIBLE_MARKERS}
    for case in GOLDEN["cases"]:
        if _has_marker(case["text"]):
            ours = tokenizer.encode(case["text"])
            assert not marker_ids & set(ours)
            assert marker_ids & set(case["ids"])  # llama.cpp did cut them out
            assert tokenizer.decode(ours) == case["text"]


def test_newline_runs_and_byte_fallback(tokenizer) -> None:
    nl = {n: tokenizer.token_id("\n" * n) for n in (1, 2, 3, 5)}
    assert tokenizer.encode("\n\n\n") == [nl[3]]  # a run that is a piece is taken whole
    assert tokenizer.encode("\n\n\n\n") == [nl[2]] * 2  # not a piece: merged like any text
    rare = "\U00013000"  # an Egyptian hieroglyph: no piece covers it
    assert not tokenizer.has_piece(rare)
    assert tokenizer.encode(rare) == [tokenizer.token_id(f"<0x{b:02X}>") for b in rare.encode()]
    assert tokenizer.decode(tokenizer.encode(rare)) == rare


def test_merge_that_builds_no_piece_is_a_clear_error() -> None:
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b"]
    with pytest.raises(CorruptFileError, match="merge 0 'a b'"):
        BPETokenizer(pieces, [3, 3, 3, 2, 1, 1], ["a b"])
