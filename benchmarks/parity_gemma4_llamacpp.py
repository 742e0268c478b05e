"""Gemma 4 GGUF layout checked against llama.cpp itself (not CI: needs llama-cpp-python).

No Gemma 4 GGUF can be downloaded here, so this builds the tiny random Gemma 4 models of tests/test_families.py
(E2B-like: PLE + KV sharing; 31B-like: K=V; 26B-A4B-like: MoE, fused and split expert tensors), writes each as a
GGUF in llama.cpp's layout, and runs the same token ids through three engines:

- transformers' ``Gemma4ForCausalLM`` on the original weights (the reference),
- llama.cpp (llama-cpp-python, f32 KV cache) on the GGUF,
- gemmakit on the GGUF.

If llama.cpp accepts the file and its logits match transformers', the tensor names, shapes and meanings
(router scale, per-expert scale, rope_freqs, layer_output_scale) that gemmakit reads are the ones llama.cpp's
real files use.

Then the files `gemmakit quantize` writes from the same folders (with a Gemma 4 tokenizer.json added), in
Q8_0 (written by gemmakit) and Q4_K_M (gemmakit's BF16 file quantized by llama.cpp): llama.cpp must load them,
and its logits must match gemmakit's on the same file.

    python benchmarks/parity_gemma4_llamacpp.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_convert import GOLDEN, _vocab_sized, write_gemma4_tokenizer
from test_families import build, gemma4, write_gemma4_gguf

import gemmakit

CASES = [("gemma4_e2b", False), ("gemma4_31b", False), ("gemma4_26b_a4b", False), ("gemma4_26b_a4b", True)]


def llamacpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)])


@torch.inference_mode()
def main() -> int:
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, split in CASES:
            folder = Path(tmp) / f"{name}-{split}"
            name, ref, ours_hf, ids = build(name, folder / "hf")
            path = folder / "model.gguf"
            write_gemma4_gguf(ref, ours_hf.config.layers, path, split_experts=split)
            want = ref(torch.tensor([ids])).logits[0].float()
            got_llamacpp = llamacpp_logits(path, ids)
            got_ours = gemmakit.load(path).logits(ids)
            d_cpp = (got_llamacpp - want).abs().max().item()
            d_ours = (got_ours - want).abs().max().item()
            d_both = (got_ours - got_llamacpp).abs().max().item()
            # llama.cpp's CPU GELU goes through an fp16 table, so it sits ~1e-2 from fp32 references; a misread
            # tensor (a scale ignored, halves swapped) would show up orders of magnitude larger.
            rel = d_cpp / want.abs().max().item()
            same_top1 = (got_llamacpp.argmax(-1) == want.argmax(-1)).float().mean().item()
            worst = max(worst, rel)
            label = name + (" (split experts)" if split else "")
            print(f"{label:32s} max|logits diff|: llama.cpp-transformers {d_cpp:.2e} ({rel:.1e} of max|logit|), "
                  f"gemmakit-transformers {d_ours:.2e}, gemmakit-llama.cpp {d_both:.2e}; "
                  f"llama.cpp top-1 agrees at {same_top1:.0%} of positions")
    written_ok = check_written_files()
    ok = worst < 2e-3 and written_ok
    print("OK" if ok else "MISMATCH: llama.cpp reads these files differently")
    return 0 if ok else 1


@torch.inference_mode()
def check_written_files() -> float:
    """llama.cpp on the files `gemmakit quantize` writes, against gemmakit on the same files. F32 files must agree
    as closely as the hand-written ones above; on quantized files llama.cpp also rounds the activations (to 8
    bits) and runs GELU through an fp16 table, so the two differ by about as much as llama.cpp's own F32 and
    quantized runs differ (printed beside it; required: at most twice it): a misread tensor would be far past
    both. Returns whether every file passed."""
    from gemmakit.convert import quantize_folder

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("e2b", "31b", "26b"):
            folder = Path(tmp) / kind
            build(f"gemma4_{kind}", folder / "hf", factory=_vocab_sized(lambda: gemma4(kind), len(GOLDEN["pieces"])))
            write_gemma4_tokenizer(folder / "hf")
            ids = torch.randint(3, len(GOLDEN["pieces"]), (40,), generator=torch.Generator().manual_seed(1)).tolist()
            float_cpp = None
            for qtype in ("F32", "Q8_0", "Q4_K_M"):
                path = quantize_folder(folder / "hf", folder / f"{qtype}.gguf", qtype)
                ours, theirs = gemmakit.load(path).logits(ids), llamacpp_logits(path, ids)
                scale = theirs.abs().max().item()
                rel = (ours - theirs).abs().max().item() / scale
                agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
                if float_cpp is None:
                    float_cpp, note = theirs, ""
                    ok &= rel < 2e-3
                else:
                    shift = (theirs - float_cpp).abs().max().item() / scale
                    ok &= rel <= 2 * shift
                    note = f", llama.cpp's own {qtype} vs F32 shift {shift:.1e}"
                print(f"gemmakit quantize {kind:4s} {qtype:7s} max|gemmakit - llama.cpp| = {rel:.1e} of max|logit|"
                      f"{note}; top-1 agrees at {agree:.0%} of positions")
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
