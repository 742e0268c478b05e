"""Tokenizer ids must equal llama.cpp's on the same GGUF (golden ids from scripts/make_tokenizer_golden.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gemmakit.tokenizer import StreamDecoder

GOLDEN = json.loads((Path(__file__).parent / "data" / "tokenizer_golden.json").read_text())
CASES = GOLDEN["cases"]


@pytest.fixture(scope="module")
def tok(llm):
    return llm.tokenizer


def test_golden_corpus_is_varied() -> None:
    texts = [c["text"] for c in CASES]
    assert len(texts) >= 50
    assert any(" " * 32 in t for t in texts) and any("\t" in t for t in texts) and any("\n\n" in t for t in texts)
    assert any("你好" in t for t in texts) and any("🤖" in t for t in texts) and any("<start_of_turn>" in t for t in texts)


@pytest.mark.parametrize("case", CASES, ids=lambda c: repr(c["text"][:24]))
def test_ids_match_llama_cpp(tok, case) -> None:
    assert tok.encode(case["text"]) == case["ids"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: repr(c["text"][:24]))
def test_special_parsing_matches_llama_cpp(tok, case) -> None:
    assert tok.encode(case["text"], parse_special=True) == case["ids_special"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: repr(c["text"][:24]))
def test_decode_inverts_encode(tok, case) -> None:
    assert tok.decode(tok.encode(case["text"])) == case["text"]


def test_space_run_split_is_sentencepiece(tok) -> None:
    # 32 spaces + word: the 31-space piece, then "▁compatible" (transformers' GGUF tokenizer gives 16 + 16).
    ids = tok.encode(" " * 32 + "compatible")
    assert [tok.pieces[i] for i in ids] == [" " * 31, "\u2581compatible"]


def test_control_strings_are_text_unless_parsed(tok) -> None:
    text = "<start_of_turn>user\nhi<end_of_turn>"
    plain = tok.encode(text)
    assert tok.token_id("<start_of_turn>") not in plain and tok.token_id("<end_of_turn>") not in plain
    parsed = tok.encode(text, parse_special=True)
    assert parsed[0] == tok.token_id("<start_of_turn>") and parsed[-1] == tok.token_id("<end_of_turn>")


def test_bos_and_decode_of_control_tokens(tok) -> None:
    ids = tok.encode("Hi", add_bos=True)
    assert ids[0] == tok.bos_id == 2
    assert tok.decode(ids) == "<bos>Hi"
    assert tok.decode(ids, skip_special_tokens=True) == "Hi"


def test_random_unicode_round_trips(tok) -> None:
    rng = random.Random(0)
    alphabet = "ab \n\t\u00e9\u4f60\u597d\U0001f916\u0301\u200b<>/_0123456789\u0410\u05d0\u0e01\U00020000"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert tok.decode(tok.encode(text)) == text


def test_stream_decoder_never_splits_a_character(tok) -> None:
    text = "Emoji 🤖 and rare 𪚥 and 你好 done"
    ids = tok.encode(text)
    byte_pieces = [i for i in ids if tok.pieces[i].startswith("<0x")]
    assert byte_pieces, "the text must exercise byte-fallback pieces"
    dec = StreamDecoder(tok)
    deltas = [dec.add(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("long_piece", [False, True])
def test_vocabulary_wire_format_equals_protobuf(long_piece) -> None:
    """The hand-assembled ModelProto pieces parse to exactly what the protobuf API would write."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from gemmakit.tokenizer import _pieces_wire

    pieces = ["<pad>", "<eos>", "\u2581hello", "wörld", "  ", "<0x41>"] + (["x" * 130] if long_piece else [])
    scores = [0.0, 0.0, -1.5, -2.25, 0.0, 0.0] + ([-3.0] if long_piece else [])
    types = [3, 3, 1, 1, 4, 6] + ([1] if long_piece else [])
    parsed = pb.ModelProto()
    parsed.ParseFromString(_pieces_wire(pieces, scores, types))
    assert [p.piece for p in parsed.pieces] == pieces
    assert [p.score for p in parsed.pieces] == scores
    assert [p.type for p in parsed.pieces] == [3, 3, 1, 1, 1, 6] + ([1] if long_piece else [])
