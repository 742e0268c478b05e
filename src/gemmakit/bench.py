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


def run_bench(path: str | None = None, prompt_tokens: int = 512, decode_tokens: int = 64,
              threads: int | None = None) -> dict[str, float | int | str]:
    """Measure one model; returns a flat dict of figures (seconds, tokens per second, MiB)."""
    from . import load
    from .generate import decode_step, prefill
    from .kv_cache import KVCache

    t0 = time.perf_counter()
    llm = load(path, threads=threads)
    load_s = time.perf_counter() - t0
    ids = bench_prompt_ids(llm, prompt_tokens)

    cache = KVCache(llm.config, 1, len(ids) + decode_tokens + 1)
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
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "peak_rss_mib": peak_rss_mib(),
        "prompt_tokens": len(ids),
        "prefill_tok_s": len(ids) / prefill_s,
        "decode_tokens": decode_tokens,
        "decode_tok_s": decode_tokens / decode_s,
        "ttft_s": ttft_s,
    }
