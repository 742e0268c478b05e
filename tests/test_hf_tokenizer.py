"""Tokenizer from a Hugging Face tokenizer.json (the HF-folder path), same interface as the GGUF tokenizer."""

from __future__ import annotations

from tokenizers import Tokenizer as HFTok
from tokenizers import decoders, models, normalizers, AddedToken

from gemmakit.tokenizer import HFTokenizer, StreamDecoder


def make_tokenizer_json(folder) -> None:
    """A small Gemma-like BPE: byte fallback, '▁' for spaces, control tokens as special added tokens."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["h", "e", "l", "o", "▁", "w", "r", "d", "he", "ll", "hell", "hello", "▁w", "or", "▁wor", "▁world"]:
        vocab[piece] = len(vocab)
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("▁", "w"), ("o", "r"), ("▁w", "or"),
              ("▁wor", "l"), ("▁worl", "d")]
    vocab["▁worl"] = len(vocab)
    tok = HFTok(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken("<start_of_turn>", special=True), AddedToken("<end_of_turn>", special=True)])
    tok.save(str(folder / "tokenizer.json"))


def test_hf_tokenizer_encodes_decodes_and_guards_control_tokens(tmp_path) -> None:
    make_tokenizer_json(tmp_path)
    tok = HFTokenizer.from_folder(tmp_path)
    assert tok is not None and (tok.bos_id, tok.eos_id) == (2, 1)
    ids = tok.encode("hello world", add_bos=True)
    assert ids == [2, tok.token_id("hello"), tok.token_id("▁world")]
    assert tok.decode(ids) == "<bos>hello world" and tok.decode(ids, skip_special_tokens=True) == "hello world"
    # Byte fallback for characters outside the vocabulary, exact round trip.
    text = "héllo 🤖"
    assert tok.decode(tok.encode(text)) == text
    dec = StreamDecoder(tok)
    assert "".join(dec.add(i) for i in tok.encode(text)) + dec.flush() == text
    # Control strings stay text unless asked to parse them.
    turn = tok.token_id("<start_of_turn>")
    assert turn not in tok.encode("<start_of_turn>hello")
    assert tok.encode("<start_of_turn>hello", parse_special=True) == [turn, tok.token_id("hello")]
    assert tok.is_control(turn) and not tok.is_control(tok.token_id("hello"))


def test_folder_without_tokenizer_json(tmp_path) -> None:
    assert HFTokenizer.from_folder(tmp_path) is None


def test_gemma4_markers_stay_visible_in_decoded_text(tmp_path) -> None:
    """Gemma 4's channel and tool-call markers are special tokens in tokenizer.json, but the output parser reads
    them from the decoded stream, so they decode as text (llama.cpp's converter makes them user-defined too)."""
    make_tokenizer_json(tmp_path)
    raw = HFTok.from_file(str(tmp_path / "tokenizer.json"))
    raw.add_special_tokens([AddedToken("<|channel>", special=True), AddedToken("<channel|>", special=True),
                            AddedToken("<turn|>", special=True)])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer.from_folder(tmp_path)
    ids = tok.encode("<|channel>hello<channel|>world<turn|>", parse_special=True)
    dec = StreamDecoder(tok)
    assert "".join(dec.add(i) for i in ids) + dec.flush() == "<|channel>hello<channel|>world"
    assert tok.token_id("<|channel>") not in tok.encode("<|channel>hello")  # user text stays text
