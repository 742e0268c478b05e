"""The quality cost of quantize-at-load (quant="int8" / "int4": Q8_0 / Q4_1), as next-token NLL on a text.

    python benchmarks/quant_quality.py

1. The default model (Gemma 3 270M) with every weight dequantized to float32 (quant="fp32") is the float
   reference; its matrices rounded to bfloat16, then quantized to int8 and int4 the way a Hugging Face folder is
   at load (quant/convert.py), give the NLL of each format on the same text.
2. A random-weight Gemma 4 E2B-like model (tests/test_families.py), saved as a Hugging Face folder and loaded
   with dtype float32, bfloat16, quant="int8" and quant="int4": NLL on random token ids (the absolute values mean
   nothing for random weights; the differences show the format's cost on Gemma 4's layout, PLE included).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import gemmakit  # noqa: E402
from gemmakit.quant.convert import quantizable, quantize_matrix  # noqa: E402
from gemmakit.quant.linear import QuantEmbedding, QuantLinear  # noqa: E402

TEXT = ("The history of computing is a story of people finding ways to make machines do arithmetic faster and more "
        "reliably. Early mechanical calculators gave way to relays, vacuum tubes and transistors, and each step made "
        "the machines smaller, cheaper and more dependable. Today a phone holds more computing power than the "
        "machines that guided the first missions to the moon, and the same ideas run through all of them: store a "
        "program, fetch an instruction, do what it says, and move on to the next one. Memory grew from a few words of "
        "mercury delay lines to billions of bytes on a single chip, while the programs people wrote grew from a few "
        "hundred instructions punched on paper tape to operating systems of tens of millions of lines. Along the way "
        "programmers learned to share their work: libraries, compilers, networks and, eventually, the open source "
        "projects that most software now stands on.")


def nll(logits: torch.Tensor, ids: list[int]) -> float:
    return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).item()


def requantize(model: torch.nn.Module, kind: str | None) -> None:
    """Round every float matrix to bfloat16 and, with ``kind``, quantize it as quant=kind does at load."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, (torch.nn.Linear, torch.nn.Embedding)):
                continue
            weight = child.weight.detach().to(torch.bfloat16)
            if kind is None or not quantizable(tuple(weight.shape)):
                child.weight.data = weight.float()
                continue
            quant = quantize_matrix(lambda a, b, w=weight: w[a:b], *weight.shape, kind)
            setattr(module, name, (QuantEmbedding if isinstance(child, torch.nn.Embedding) else QuantLinear)(quant))


@torch.inference_mode()
def default_model() -> None:
    base = gemmakit.load(quant="fp32")
    ids = base.tokenizer.encode(TEXT, add_bos=True)
    reference = nll(base.logits(ids), ids)
    print(f"default model (Gemma 3 270M, dequantized Q4_K_M), {len(ids)} tokens:")
    print(f"  float32      NLL {reference:.4f}")
    for kind in (None, "int8", "int4"):
        llm = gemmakit.load(quant="fp32")
        requantize(llm.model, kind)
        value = nll(llm.logits(ids), ids)
        print(f"  {kind or 'bfloat16':12s} NLL {value:.4f}  ({100 * (value - reference) / reference:+.2f}%)")


@torch.inference_mode()
def random_gemma4() -> None:
    from test_families import build, gemma4

    config = gemma4("e2b")
    config.hidden_size_per_layer_input = 32
    with tempfile.TemporaryDirectory() as tmp:
        _, _, llm, ids = build("gemma4_e2b", Path(tmp) / "hf", factory=lambda: config)
        ids = (ids * 4)[:256]
        reference = nll(llm.logits(ids), ids)
        print(f"random Gemma 4 E2B-like model, {len(ids)} random tokens:")
        print(f"  float32      NLL {reference:.4f}")
        for label, kwargs in (("bfloat16", {"dtype": "bfloat16"}), ("int8", {"quant": "int8"}),
                              ("int4", {"quant": "int4"})):
            value = nll(gemmakit.load(Path(tmp) / "hf", **kwargs).logits(ids), ids)
            print(f"  {label:12s} NLL {value:.4f}  ({100 * (value - reference) / reference:+.2f}%)")


if __name__ == "__main__":
    default_model()
    random_gemma4()
