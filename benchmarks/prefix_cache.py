"""Prefix caching: the time to first token of a conversation's sixth turn (~2,000 tokens of history) with the
cache and without, through two `gemmakit serve` processes taking turns.

    python benchmarks/prefix_cache.py [--model PATH.gguf] [--threads 2] [--rounds 3] [--answer-tokens 300]

Each round holds one conversation per server (a plain-completion transcript: the bundled model is a base model):
five turns of a ~60-token user message and a greedy answer of --answer-tokens tokens, then the sixth user message,
whose streamed first token is timed. Prints the medians, the ratio without / with, and the server's prefix-cache
counters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (benchmarks/ is not a package)

TOPICS = ["lighthouses", "bread", "old maps", "trains", "rivers", "clocks"]


def turn(url: str, prompt: str, max_tokens: int) -> tuple[str, float]:
    """The answer to a transcript, and the time to its first token."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    start, first, parts = time.perf_counter(), None, []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text = json.loads(line[6:])["choices"][0]["text"]
                first = first or time.perf_counter()
                parts.append(text)
    return "".join(parts), (first or time.perf_counter()) - start


def conversation(url: str, topic: str, answer_tokens: int) -> tuple[float, int]:
    """The sixth turn's TTFT, and the transcript's length in characters."""
    transcript = ""
    for k in range(1, 7):
        user = (f"User: Tell me more about {topic}, part {k}. I want details on their history, how people used "
                f"them, and what changed over the centuries, with examples.\nAssistant:")
        transcript += user
        answer, ttft = turn(url, transcript, answer_tokens if k < 6 else 4)
        transcript += answer + "\n"
    return ttft, len(transcript)


def counters(url: str) -> str:
    text = httpx.get(url + "/metrics", timeout=30).text
    return ", ".join(line for line in text.splitlines() if line.startswith("gemmakit_prefix_cache"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF path (default: the bundled Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--answer-tokens", type=int, default=300)
    args = ap.parse_args()
    if args.model is None:
        from gemmakit import default_model_path

        args.model = str(default_model_path())
    args.max_batch, args.kv_cache_mib, args.decode_x_bits = 4, 1024, 16
    servers = {"cache": serve_load.start("gemmakit", args),
               "no cache": serve_load.start("gemmakit", args, extra=["--no-prefix-cache"])}
    times: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for r in range(args.rounds):
            for name, (_, url) in servers.items():
                ttft, chars = conversation(url, TOPICS[r % len(TOPICS)], args.answer_tokens)
                times[name].append(ttft)
                print(f"round {r + 1} {name:8s}: turn 6 TTFT {ttft * 1000:7.1f} ms ({chars} characters of history)",
                      flush=True)
        print("counters (cache):", counters(servers["cache"][1]))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    ratios = [b / a for a, b in zip(times["cache"], times["no cache"])]
    print(f"turn 6 TTFT: cache {statistics.median(times['cache']) * 1000:.1f} ms, no cache "
          f"{statistics.median(times['no cache']) * 1000:.1f} ms: {statistics.median(ratios):.1f}x faster "
          f"(rounds: {', '.join(f'{x:.1f}' for x in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
