"""gemmakit vs llama.cpp on full-size Gemma 4 shapes with random weights (no Gemma 4 weights can be downloaded).

    python benchmarks/gemma4_shapes.py [--shapes e2b,e4b,26b] [--dir DIR] [--rounds 3] [--threads 2]
                                       [--prompt-tokens 512] [--layers-26b 4] [--keep] [--prepare]

For each shape: writes an F16 GGUF in llama.cpp's Gemma 4 layout (the real variant's config: sizes, layer
pattern, PLE, KV sharing, double-wide MLP, K = V, experts; the 26B-A4B cut to --layers-26b layers so it fits
here), quantizes it to Q4_K_M with llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize), then
runs benchmarks/vs_llamacpp.py on the quantized file: alternating processes, load + first token, prefill,
decode and peak RSS, with the ratios gemmakit / llama.cpp. The vocabulary is the bundled model's (262,144
pieces, Gemma 4's size). The F16 file is deleted after quantizing unless --keep.

Needs llama-cpp-python (see vs_llamacpp.py) and ~15 GB of free disk for E4B's F16 file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

VOCAB = 262144


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    global_kv_heads: int
    ffn: int
    ple: int
    kv_shared: int
    window: int
    pattern: int  # a full-attention layer every `pattern` layers
    double_wide: bool = False
    k_eq_v: bool = False
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0


SHAPES = {  # ../shared/docs/gemma-architectures.md section 6.2
    "e2b": Shape(1536, 35, 8, 1, 1, 6144, 256, 20, 512, 5, double_wide=True),
    "e4b": Shape(2560, 42, 8, 2, 2, 10240, 256, 18, 512, 6),
    "26b": Shape(2816, 30, 16, 8, 2, 2112, 0, 0, 1024, 6, k_eq_v=True, experts=128, top_k=8, expert_ffn=704),
}
HEAD, GLOBAL_HEAD = 256, 512


class Weights:
    """Random values from a fixed pool (rotated per tensor): generating billions of fresh normals would take
    longer than the benchmark, and the speed measured does not depend on them."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(np.float16)
        self.turn = 0

    def matrix(self, shape: tuple[int, ...]) -> np.ndarray:
        self.turn = (self.turn + 7919) % len(self.pool)
        return np.resize(np.roll(self.pool, self.turn), shape)


def tensor_list(s: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape, kind) in llama.cpp's layout; kind is "matrix" (F16), "norm" or "scalar" (F32)."""
    E, L, P = s.hidden, s.layers, s.ple
    out = [("token_embd.weight", (VOCAB, E), "matrix"), ("output_norm.weight", (E,), "norm"),
           ("rope_freqs.weight", (GLOBAL_HEAD // 2,), "rope")]
    if P:
        out += [("per_layer_token_embd.weight", (VOCAB, L * P), "matrix"),
                ("per_layer_model_proj.weight", (L * P, E), "matrix"), ("per_layer_proj_norm.weight", (P,), "norm")]
    first_shared = L - s.kv_shared
    for i in range(L):
        full = (i + 1) % s.pattern == 0
        D = GLOBAL_HEAD if full else HEAD
        kv = s.global_kv_heads if (full and s.k_eq_v) else s.kv_heads
        ffn = s.ffn * 2 if (s.double_wide and i >= first_shared) else s.ffn
        b = f"blk.{i}."
        out += [(b + "attn_norm.weight", (E,), "norm"), (b + "attn_q.weight", (s.heads * D, E), "matrix"),
                (b + "attn_q_norm.weight", (D,), "norm"), (b + "attn_output.weight", (E, s.heads * D), "matrix"),
                (b + "post_attention_norm.weight", (E,), "norm"), (b + "ffn_norm.weight", (E,), "norm"),
                (b + "ffn_gate.weight", (ffn, E), "matrix"), (b + "ffn_up.weight", (ffn, E), "matrix"),
                (b + "ffn_down.weight", (E, ffn), "matrix"), (b + "post_ffw_norm.weight", (E,), "norm"),
                (b + "layer_output_scale.weight", (1,), "scalar")]
        if i < first_shared:
            out += [(b + "attn_k.weight", (kv * D, E), "matrix"), (b + "attn_k_norm.weight", (D,), "norm")]
            if not (full and s.k_eq_v):
                out.append((b + "attn_v.weight", (kv * D, E), "matrix"))
        if P:
            out += [(b + "inp_gate.weight", (P, E), "matrix"), (b + "proj.weight", (E, P), "matrix"),
                    (b + "post_norm.weight", (E,), "norm")]
        if s.experts:
            n, F = s.experts, s.expert_ffn
            out += [(b + "ffn_gate_inp.weight", (n, E), "matrix"), (b + "ffn_gate_inp.scale", (E,), "norm"),
                    (b + "ffn_down_exps.scale", (n,), "norm"), (b + "ffn_gate_up_exps.weight", (n, 2 * F, E), "matrix"),
                    (b + "ffn_down_exps.weight", (n, E, F), "matrix"), (b + "pre_ffw_norm_2.weight", (E,), "norm"),
                    (b + "post_ffw_norm_1.weight", (E,), "norm"), (b + "post_ffw_norm_2.weight", (E,), "norm")]
    return out


def write_metadata(w, s: Shape) -> None:
    from gemmakit import default_model_path
    from gemmakit.weights.gguf import GGUFFile

    a = "gemma4."
    first_shared = s.layers - s.kv_shared
    w.add_uint32(a + "context_length", 131072)
    w.add_uint32(a + "embedding_length", s.hidden)
    w.add_uint32(a + "block_count", s.layers)
    w.add_array(a + "feed_forward_length", [s.ffn * 2 if (s.double_wide and i >= first_shared) else s.ffn
                                            for i in range(s.layers)])
    w.add_uint32(a + "attention.head_count", s.heads)
    w.add_array(a + "attention.head_count_kv", [s.global_kv_heads if ((i + 1) % s.pattern == 0 and s.k_eq_v)
                                                else s.kv_heads for i in range(s.layers)])
    w.add_uint32(a + "attention.key_length", GLOBAL_HEAD)
    w.add_uint32(a + "attention.key_length_swa", HEAD)
    w.add_uint32(a + "attention.value_length", GLOBAL_HEAD)
    w.add_uint32(a + "attention.value_length_swa", HEAD)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(a + "rope.dimension_count", GLOBAL_HEAD)
    w.add_uint32(a + "rope.dimension_count_swa", HEAD)
    w.add_float32(a + "rope.freq_base", 1_000_000.0)
    w.add_float32(a + "rope.freq_base_swa", 10_000.0)
    w.add_uint32(a + "attention.sliding_window", s.window)
    w.add_array(a + "attention.sliding_window_pattern", [(i + 1) % s.pattern != 0 for i in range(s.layers)])
    w.add_uint32(a + "attention.shared_kv_layers", s.kv_shared)
    w.add_uint32(a + "embedding_length_per_layer_input", s.ple)
    w.add_float32(a + "final_logit_softcapping", 30.0)
    if s.experts:
        w.add_uint32(a + "expert_count", s.experts)
        w.add_uint32(a + "expert_used_count", s.top_k)
        w.add_uint32(a + "expert_feed_forward_length", s.expert_ffn)
    meta = GGUFFile(default_model_path()).metadata  # the bundled model's 262,144-piece vocabulary
    w.add_tokenizer_model("llama")
    w.add_token_list(list(meta["tokenizer.ggml.tokens"]))
    w.add_token_scores([float(x) for x in meta["tokenizer.ggml.scores"]])
    w.add_token_types([int(t) for t in meta["tokenizer.ggml.token_type"]])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)


def write_f16(path: Path, s: Shape) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter

    tensors = tensor_list(s)
    w = GGUFWriter(str(path), "gemma4")
    write_metadata(w, s)
    for name, shape, kind in tensors:
        dtype = np.float16 if kind == "matrix" else np.float32
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        w.add_tensor_info(name, shape, np.dtype(dtype), nbytes,
                          GGMLQuantizationType.F16 if kind == "matrix" else GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    weights = Weights()
    rotated = int(0.25 * GLOBAL_HEAD // 2)  # proportional RoPE: llama.cpp freezes the rest with a divisor of 1e30
    for name, shape, kind in tensors:
        if kind == "matrix":
            data = weights.matrix(shape)
        elif kind == "rope":
            data = np.array([1.0] * rotated + [1e30] * (shape[0] - rotated), dtype=np.float32)
        else:  # norms, router scales and layer scalars near 1, as trained ones are
            data = (1.0 + weights.matrix(shape).astype(np.float32)).astype(np.float32)
        w.write_tensor_data(data)
    w.close()


def quantize(src: Path, dst: Path, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="e2b,e4b,26b")
    ap.add_argument("--dir", default="/tmp/gemma4-shapes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    # Six keeps one global layer (K = V, 512-wide heads): llama.cpp refuses a Gemma 4 file with rope_freqs and no
    # global layer to read it ("wrong number of tensors").
    ap.add_argument("--layers-26b", type=int, default=6, help="layers of the cut 26B-A4B (30 do not fit here)")
    ap.add_argument("--keep", action="store_true", help="keep the F16 files")
    ap.add_argument("--prepare", action="store_true", help="only write and quantize the files")
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        if name == "26b":
            shape = Shape(**{**shape.__dict__, "layers": args.layers_26b})
        q4 = folder / f"gemma4-{name}-q4_k_m.gguf"
        if not q4.exists():
            f16 = folder / f"gemma4-{name}-f16.gguf"
            t = time.perf_counter()
            write_f16(f16, shape)
            print(f"{name}: wrote {f16} ({f16.stat().st_size / 2**30:.1f} GiB) in {time.perf_counter() - t:.0f} s",
                  flush=True)
            t = time.perf_counter()
            quantize(f16, q4, args.threads)
            print(f"{name}: quantized to {q4} ({q4.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s",
                  flush=True)
            if not args.keep:
                f16.unlink()
        if args.prepare:
            continue
        print(f"== {name} ({shape.layers} layers) vs llama.cpp, Q4_K_M", flush=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_llamacpp.py"), "--model", str(q4), "--threads",
                        str(args.threads), "--rounds", str(args.rounds), "--prompt-tokens", str(args.prompt_tokens)],
                       check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
