"""Regenerate tests/data/gemma4_tokenizer_golden.json: a small Gemma 4-style vocabulary and llama.cpp's ids for it.

No Gemma 4 GGUF can be downloaded here, so this builds a vocabulary shaped like one
(``tokenizer.ggml.model = "gemma4"``: SentencePiece-style BPE with merges, U+2581 for spaces, ``<0xXX>`` byte
pieces, Gemma 4's control and visible marker pieces, newline-run pieces) by training a 3,000-piece BPE on text
files, writes it as a vocabulary-only GGUF, and records llama.cpp's token ids for a varied corpus. The tests
rebuild the same GGUF from the JSON and compare gemmakit's ids with these.

    pip install llama-cpp-python==0.3.36
    python scripts/make_gemma4_tokenizer_golden.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "gemma4_tokenizer_golden.json"
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

from make_tokenizer_golden import CORPUS as GEMMA3_CORPUS

CONTROL, USER_DEFINED, BYTE, NORMAL = 3, 4, 6, 1
HEAD = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", 2), ("<mask>", CONTROL),
        ("<|turn>", CONTROL), ("<turn|>", CONTROL), ("<|think|>", CONTROL), ("<|tool>", CONTROL), ("<tool|>", CONTROL),
        ("<|channel>", USER_DEFINED), ("<channel|>", USER_DEFINED), ("<|tool_call>", USER_DEFINED),
        ("<tool_call|>", USER_DEFINED), ("<|tool_response>", USER_DEFINED), ("<tool_response|>", USER_DEFINED),
        ('<|"|>', USER_DEFINED)]
# Newline runs are whole pieces that no merge produces (llama.cpp takes them whole).
NEWLINE_RUNS = ["\n\n", "\n\n\n", "\n\n\n\n\n"]

EXTRA_CORPUS = [
    "<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n",
    "<|channel>thought\nsimple<channel|>4",
    '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>',
    "user types <|turn>model and <turn|> as text",
    "\n\n\n\n",
    "a\n\n\nb\n\n\n\n\nc\n\n\n\n\n\nd",
    "\r\n\r\n",
    "x" * 200,
    "word " * 40,
    "  ▁ literal lower block ▁▁ in text",
    "Ω≈ç√∫˜µ≤≥÷ åß∂ƒ©˙∆˚¬…æ",
]


def training_text() -> list[str]:
    texts = [p.read_text() for p in sorted((ROOT.parent / "shared" / "docs").glob("*.md"))]
    texts += [p.read_text() for p in sorted((ROOT / "src" / "gemmakit").rglob("*.py"))]
    # No NUL piece: llama.cpp reads GGUF strings as C strings, so a "\x00" piece would be unreachable there.
    # No marker text either: in a real vocabulary no merge builds a control piece.
    out = []
    for t in texts + GEMMA3_CORPUS:
        for piece in ["\x00"] + [p for p, _ in HEAD]:
            t = t.replace(piece, "")
        out.append(t)
    return out


def train_vocab() -> tuple[list[str], list[int], list[str]]:
    from tokenizers import (
        Regex,
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), behavior="isolated")
    head = [p for p, _ in HEAD] + [f"<0x{b:02X}>" for b in range(256)] + NEWLINE_RUNS
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=head, show_progress=False,
                                  max_token_length=16)
    tok.train_from_iterator(training_text(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    pieces = sorted(vocab, key=vocab.get)
    assert pieces[: len(head)] == head
    types = [t for _, t in HEAD] + [BYTE] * 256 + [NORMAL] * (len(pieces) - len(HEAD) - 256)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return pieces, types, merges


def write_vocab_gguf(pieces: list[str], types: list[int], merges: list[str], path: Path) -> None:
    """A vocabulary-only Gemma 4 GGUF (the hyperparameters llama.cpp reads, no tensors)."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "gemma4")
    a = "gemma4."
    for key, value in [("context_length", 256), ("embedding_length", 64), ("block_count", 5),
                       ("attention.head_count", 4), ("attention.key_length", 32), ("attention.value_length", 32),
                       ("attention.key_length_swa", 16), ("attention.value_length_swa", 16),
                       ("attention.sliding_window", 8), ("embedding_length_per_layer_input", 0),
                       ("rope.dimension_count", 32), ("rope.dimension_count_swa", 16)]:
        w.add_uint32(a + key, value)
    w.add_array(a + "feed_forward_length", [96] * 5)
    w.add_array(a + "attention.head_count_kv", [1] * 5)
    w.add_array(a + "attention.sliding_window_pattern", [True, True, True, True, False])
    w.add_float32(a + "attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tokenizer_model("gemma4")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * len(pieces))
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    from llama_cpp import Llama, __version__

    pieces, types, merges = train_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gemma4-vocab.gguf"
        write_vocab_gguf(pieces, types, merges, path)
        llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
        cases = []
        for text in GEMMA3_CORPUS + EXTRA_CORPUS:
            raw = text.encode("utf-8")
            cases.append({"text": text, "ids": llm.tokenize(raw, add_bos=False, special=False),
                          "ids_special": llm.tokenize(raw, add_bos=False, special=True)})
    OUT.write_text(json.dumps({"generator": f"llama-cpp-python {__version__}", "pieces": pieces, "types": types,
                               "merges": merges, "cases": cases}, ensure_ascii=False, indent=0) + "\n")
    print(f"wrote {len(pieces)} pieces, {len(merges)} merges, {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
