"""Tiny GGUF files written with gguf.GGUFWriter, for loader and error tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

TINY = dict(hidden=64, heads=2, kv_heads=1, head_dim=32, ffn=128, layers=2, window=8, ctx=128)


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece-style vocabulary: specials, turn markers, 256 byte pieces and some words."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    types = [3, 3, 3, 2, 3, 3, 3]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    words = ["\u2581", "a", "b", "c", "\u2581a", "\u2581b", "ab", "\u2581ab", "hello", "\u2581hello", "\n", "\n\n"]
    pieces += words
    types += [1] * (len(words) - 2) + [4, 4]
    scores = [0.0] * len(pieces)
    for i in range(len(pieces) - len(words), len(pieces)):
        scores[i] = -float(i)
    return pieces, scores, types


def tiny_tensors(cfg: dict, vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    E, H, Hkv, D, F = cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["ffn"]

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    t = {"token_embd.weight": w(vocab, E), "output_norm.weight": norm(E)}
    for i in range(cfg["layers"]):
        p = f"blk.{i}."
        t |= {
            p + "attn_norm.weight": norm(E),
            p + "attn_q.weight": w(H * D, E),
            p + "attn_k.weight": w(Hkv * D, E),
            p + "attn_v.weight": w(Hkv * D, E),
            p + "attn_output.weight": w(E, H * D),
            p + "attn_q_norm.weight": norm(D),
            p + "attn_k_norm.weight": norm(D),
            p + "post_attention_norm.weight": norm(E),
            p + "ffn_norm.weight": norm(E),
            p + "ffn_gate.weight": w(F, E),
            p + "ffn_up.weight": w(F, E),
            p + "ffn_down.weight": w(E, F),
            p + "post_ffw_norm.weight": norm(E),
        }
    return t


def write_tiny_gguf(
    path: Path,
    arch: str = "gemma3",
    drop: tuple[str, ...] = (),
    extra: dict[str, np.ndarray] | None = None,
    reshape: dict[str, tuple[int, ...]] | None = None,
    raw_types: dict[str, GGMLQuantizationType] | None = None,
    seed: int = 0,
    chat_template: str | None = None,
    metadata: dict[str, float | int] | None = None,
    context: int | None = None,
) -> Path:
    """Write a tiny random Gemma 3 GGUF (F32 weights), optionally with tensors dropped, added or misshaped, and
    extra metadata (``{key: value}``: floats as float32, ints as uint32; e.g. another architecture's soft-caps)."""
    cfg = TINY
    pieces, scores, types = tiny_vocab()
    rng = np.random.default_rng(seed)
    tensors = tiny_tensors(cfg, len(pieces), rng)
    for name in drop:
        tensors.pop(name)
    tensors |= extra or {}
    for name, shape in (reshape or {}).items():
        tensors[name] = np.zeros(shape, dtype=np.float32)
    w = GGUFWriter(str(path), arch)
    w.add_context_length(context or cfg["ctx"])
    w.add_embedding_length(cfg["hidden"])
    w.add_block_count(cfg["layers"])
    w.add_feed_forward_length(cfg["ffn"])
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(cfg["window"])
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_unk_token_id(3)
    w.add_add_bos_token(True)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for key, value in (metadata or {}).items():
        if isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, value)
    for name, arr in tensors.items():
        raw_type = (raw_types or {}).get(name)
        if raw_type is not None:
            w.add_tensor(name, arr, raw_dtype=raw_type)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
