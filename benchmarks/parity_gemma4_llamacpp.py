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

    python benchmarks/parity_gemma4_llamacpp.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_families import build, write_gemma4_gguf

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
    ok = worst < 2e-3
    print("OK" if ok else "MISMATCH: llama.cpp reads these files differently")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
