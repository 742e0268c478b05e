"""Hugging Face checkpoints quantized while loading (quant="int8" / "int4"): the same weights as the GGUF of the
same checkpoint in Q8_0 / Q4_1 (written with llama.cpp's own quantizers), close to the float model, and a peak
memory near the quantized size, not the bf16 model's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import gemmakit
from gemmakit.errors import InvalidParameterError
from test_families import build, gemma4, write_gemma4_gguf

QTYPES = {"int8": "Q8_0", "int4": "Q4_1"}


def _e2b_like():
    config = gemma4("e2b")
    config.hidden_size_per_layer_input = 32  # whole 32-blocks: the PLE matrices quantize too
    return config


@pytest.fixture(scope="module")
def e2b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2b")
    _, ref, llm, ids = build("gemma4_e2b", folder / "hf", factory=_e2b_like)
    return folder, ref, llm, ids


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_the_quantizers_are_ggmls_bit_for_bit(quant) -> None:
    """The PyTorch block quantizers against gguf-py's (llama.cpp's reference, in numpy) read back by the GGUF
    splitter: random rows, all-zero and constant blocks, and values on the rounding boundaries."""
    from gguf import GGMLQuantizationType, quants

    from gemmakit.quant.convert import q4_1_blocks, q8_0_blocks
    from gemmakit.quant.ggml import split

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-6, 3, 64).unsqueeze(1)
    x[3, :32] = 0.0
    x[4, 32:64] = 0.75
    x[5, :32] = torch.arange(32) * 0.5 - 8  # exact halves: ties for Q8_0's rounding
    x[6, :32] = torch.linspace(-1, 1, 32)
    qtype = GGMLQuantizationType[QTYPES[quant]]
    raw = torch.from_numpy(quants.quantize(x.numpy(), qtype))
    q_ref, scale_ref, mins_ref, _ = split(raw, qtype, tuple(x.shape))
    q, scale, mins = (q8_0_blocks if quant == "int8" else q4_1_blocks)(x)
    assert torch.equal(q, q_ref) and torch.equal(scale.float(), scale_ref)
    assert (mins is None and mins_ref is None) or torch.equal(mins.float(), mins_ref)


@pytest.mark.parametrize("quant", ["int8", "int4"])
@torch.inference_mode()
def test_quantize_at_load_equals_the_gguf_of_that_type(e2b, quant) -> None:
    folder, ref, llm, ids = e2b
    path = folder / f"{quant}.gguf"
    write_gemma4_gguf(ref, llm.config.layers, path, qtype=QTYPES[quant])
    from_gguf = gemmakit.load(path)
    quantized = gemmakit.load(folder / "hf", quant=quant)
    assert quantized.model.decode_path == "C layer loop"
    assert llm.model.decode_path.startswith("C pieces, layer by layer (layer 0: a matrix is not quantized")
    layer = quantized.model.layers[0]
    assert layer.self_attn.qkv_proj.qweight.bits == (4 if quant == "int4" else 8)
    assert type(quantized.model.embed_tokens_per_layer).__name__ == "QuantEmbedding"
    # The GGUF's per-layer-input table stays in the file's map, its rows dequantized from their blocks as
    # looked up: the same values as the packed copy the folder's load makes.
    assert type(from_gguf.model.embed_tokens_per_layer).__name__ == "MappedEmbedding"
    assert torch.equal(quantized.logits(ids), from_gguf.logits(ids))
    # And close to the float model: the cost of the format, measured in next-token NLL over the sequence.
    float_logits = llm.logits(ids)
    targets = torch.tensor(ids[1:])
    nll = {name: torch.nn.functional.cross_entropy(x[:-1], targets).item()
           for name, x in (("float", float_logits), (quant, quantized.logits(ids)))}
    assert abs(nll[quant] - nll["float"]) <= (0.01 if quant == "int8" else 0.1) * nll["float"], nll


@torch.inference_mode()
def test_quantized_decode_matches_prefill(e2b) -> None:
    """A 4-bit checkpoint decodes (integer kernels, the C layer loop, one token at a time) as its prompt pass
    computes the same positions (float matmuls on the dequantized weights), within the kernels' rounding."""
    from gemmakit.generate import decode_step, prefill
    from gemmakit.kernels import fused
    from gemmakit.kv_cache import KVCache

    from gemmakit.quant.linear import set_prefill_dtype

    folder, _, _, ids = e2b
    llm = gemmakit.load(folder / "hf", quant="int4")
    # The prompt pass in float32: by default it rounds x to 8 bits for 4-bit matrices, ~0.5% per product (held
    # to its own bound in test_quant_linear), which this random model's 10 layers amplify past 2e-2.
    set_prefill_dtype(llm.model, torch.float32)
    cache = KVCache(llm.config, 1, 64)
    prefill(llm.model, ids[:8], cache)
    assert fused._layer_table(llm.model, cache) is not None
    steps = torch.stack([decode_step(llm.model, ids[t], t, cache) for t in range(8, 24)])
    full = llm.logits(ids[:24])[8:]
    assert (steps - full).abs().max().item() <= 2e-2 and torch.equal(steps.argmax(-1), full.argmax(-1))


def test_bad_quant_choices_are_clear_errors(e2b) -> None:
    folder = e2b[0] / "hf"
    with pytest.raises(InvalidParameterError, match="choose one"):
        gemmakit.load(folder, quant="int8", dtype="float32")
    with pytest.raises(InvalidParameterError, match="quant='fp32' apply to GGUF files"):
        gemmakit.load(folder, quant="fp32")
    with pytest.raises(InvalidParameterError, match="supported modes"):
        gemmakit.load(None, quant="int4")  # a GGUF keeps its own quantization


PEAK = r"""
import json, sys
import torch, gemmakit
def kib(field):  # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's (this test's) at fork
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024
before = kib("VmRSS")
llm = gemmakit.load(sys.argv[1], quant=sys.argv[2])
size = sum(t.numel() * t.element_size() for t in list(llm.model.parameters()) + list(llm.model.buffers()))
print(json.dumps({"peak": kib("VmHWM") - before, "size": size}))
"""


def random_bf16_folder(config, folder) -> int:
    """A Hugging Face folder of random bf16 weights for ``config``, written without building the model (its
    tensor names and shapes come from a model on the meta device); returns the weights' bytes."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = {name: t.shape for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()
                  if not name.startswith("lm_head")}  # tied to the embedding
    g = torch.Generator().manual_seed(0)
    folder.mkdir()
    config.save_pretrained(folder)
    weights = {name: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for name, shape in shapes.items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * 2 for t in weights.values())


def test_peak_memory_of_quantize_at_load_is_near_the_quantized_size(tmp_path) -> None:
    """A random E2B-like bf16 folder of ~480 MB loaded with quant="int4": the memory the load adds peaks under
    1.3x what the quantized model holds (the bf16 file is read a slice at a time, never mapped whole)."""
    from transformers import Gemma4TextConfig

    types = (["sliding_attention"] * 4 + ["full_attention"]) * 2  # E2B's pattern, PLE, KV sharing, double MLP
    config = Gemma4TextConfig(vocab_size=131072, vocab_size_per_layer_input=131072, hidden_size=512,
                              intermediate_size=1024, hidden_size_per_layer_input=128, num_attention_heads=4,
                              head_dim=64, global_head_dim=128, num_hidden_layers=10, num_key_value_heads=1,
                              layer_types=types, num_kv_shared_layers=5, use_double_wide_mlp=True,
                              max_position_embeddings=256, sliding_window=8, final_logit_softcapping=30.0)
    bf16_bytes = random_bf16_folder(config, tmp_path / "hf")
    assert bf16_bytes > 400e6
    proc = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "hf"), "int4"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    print(f"bf16 {bf16_bytes / 2**20:.0f} MiB; quantized {result['size'] / 2**20:.0f} MiB; load peak "
          f"+{result['peak'] / 2**20:.0f} MiB")
    assert result["size"] < 0.4 * bf16_bytes
    assert result["peak"] <= 1.3 * result["size"]
