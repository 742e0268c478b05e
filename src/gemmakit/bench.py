"""``gemmakit bench``: load time, peak memory, prefill and decode speed on one model."""

from __future__ import annotations

import resource
import time

import torch

BENCH_TEXT = (
    "The history of computing is a story of people finding ways to make machines do arithmetic faster and "
    "more reliably. Early mechanical calculators gave way to electromechanical relays, then vacuum tubes, "
    "transistors and integrated circuits. Each step made computers smaller, cheaper and more capable. "
)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_prompt_ids(llm, n_tokens: int) -> list[int]:
    ids = llm.tokenizer.encode(BENCH_TEXT * (n_tokens // 40 + 1), add_bos=True)
    return ids[:n_tokens]


def random_config(name: str):
    """Published Gemma 4 shapes for benchmarking without weights (values from the model cards / configs)."""
    from .config import FULL, SLIDING, GemmaConfig
    from .errors import InvalidParameterError

    if name != "e2b":
        raise InvalidParameterError(f"--random-weights {name!r}: known configurations: e2b")
    layers = 35
    return GemmaConfig(
        architecture="gemma4", vocab_size=262144, hidden_size=1536, intermediate_size=6144,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
        layer_types=[FULL if (i + 1) % 5 == 0 else SLIDING for i in range(layers)], sliding_window=512,
        max_position_embeddings=131072, global_head_dim=512, global_partial_rotary_factor=0.25,
        attention_scale_one=True, use_v_norm=True, use_layer_scalar=True, final_logit_softcapping=30.0,
        hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144, num_kv_shared_layers=20,
        use_double_wide_mlp=True,
    )


def random_model(name: str, dtype: torch.dtype = torch.bfloat16):
    """A Gemma model of a published shape with random weights (no checkpoint needed)."""
    from .model import Gemma

    config = random_config(name)
    with torch.device("meta"):
        model = Gemma(config)
    g = torch.Generator().manual_seed(0)
    state = {}
    for pname, p in model.named_parameters():
        t = torch.empty(p.shape, dtype=torch.float32 if "norm" in pname else dtype)
        if "norm" in pname or pname.endswith("layer_scalar"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=g)
        state[pname] = t
    model.load_state_dict(state, assign=True, strict=True)
    model.init_buffers()
    return model.eval(), config


def run_random_bench(name: str, prompt_tokens: int, decode_tokens: int, threads: int | None) -> dict:
    from .generate import decode_step, prefill
    from .kv_cache import KVCache

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, config = random_model(name)
    load_s = time.perf_counter() - t0
    ids = [2] + list(range(1000, 1000 + prompt_tokens - 1))
    cache = KVCache(config, 1, len(ids) + decode_tokens + 1, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache)
    prefill_s = time.perf_counter() - t0
    token, position = int(torch.argmax(logits)), len(ids)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        logits = decode_step(model, token, position, cache)
        token, position = int(torch.argmax(logits)), position + 1
    decode_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": f"random-weights {name} (bf16)",
        "parameters": params,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "peak_rss_mib": peak_rss_mib(),
        "kv_cache_mib": cache.nbytes / 2**20,
        "prompt_tokens": len(ids),
        "prefill_tok_s": len(ids) / prefill_s,
        "decode_tokens": decode_tokens,
        "decode_tok_s": decode_tokens / decode_s,
    }


def run_bench(path: str | None = None, prompt_tokens: int = 512, decode_tokens: int = 64,
              threads: int | None = None, random_weights: str | None = None,
              quant: str = "auto", decode_x_bits: int = 16) -> dict[str, float | int | str]:
    """Measure one model; returns a flat dict of figures (seconds, tokens per second, MiB)."""
    from . import load
    from .generate import decode_step, prefill
    from .kv_cache import KVCache

    if random_weights:
        return run_random_bench(random_weights, prompt_tokens, decode_tokens, threads)
    t0 = time.perf_counter()
    llm = load(path, threads=threads, quant=quant, decode_x_bits=decode_x_bits)
    load_s = time.perf_counter() - t0
    ids = bench_prompt_ids(llm, prompt_tokens)

    cache = KVCache(llm.config, 1, len(ids) + decode_tokens + 1, dtype=llm.model.activation_dtype)
    t0 = time.perf_counter()
    logits = prefill(llm.model, ids, cache)
    prefill_s = time.perf_counter() - t0

    token, position = int(torch.argmax(logits)), len(ids)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        logits = decode_step(llm.model, token, position, cache)
        token, position = int(torch.argmax(logits)), position + 1
    decode_s = time.perf_counter() - t0

    short = llm.tokenizer.encode("Hello", add_bos=True)
    t0 = time.perf_counter()
    next(iter(llm.stream(short, max_tokens=1, temperature=0)))
    ttft_s = time.perf_counter() - t0
    return {
        "model": str(llm.path),
        "quant": quant,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "peak_rss_mib": peak_rss_mib(),
        "prompt_tokens": len(ids),
        "prefill_tok_s": len(ids) / prefill_s,
        "decode_tokens": decode_tokens,
        "decode_tok_s": decode_tokens / decode_s,
        "ttft_s": ttft_s,
        "kernels": kernels_label(),
        "decode_path": llm.model.decode_path,
    }


def kernels_label() -> str:
    """Which code runs the quantized matmuls: the compiled kernels, or the PyTorch fallback and why."""
    from .kernels import kernel_status

    status = kernel_status()
    return "compiled C" if status["available"] else f"PyTorch fallback, much slower ({status['reason']})"
