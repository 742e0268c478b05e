"""What a request with many stop strings costs the stream beside it (#12).

A real server on loopback (the bundled model, --max-stop raised to allow the test) runs two streams at once: a
neighbour (greedy, 160 tokens) and a request carrying N stop strings that never match. The neighbour's median
time between tokens is measured for each N, the Ns taking turns over several rounds.

    python benchmarks/stop_strings.py [--rounds 3] [--counts 0,10,1000,100000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import gemmakit  # noqa: E402
from gemmakit.server import create_app  # noqa: E402
from gemmakit.server.limits import ServerLimits  # noqa: E402
from serving import Server  # noqa: E402

TOKENS = 160


def stream_gaps(url: str, body: dict, out: list[float]) -> None:
    """Stream a completion and append the gaps between its chunks (seconds) to ``out``."""
    last = None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                if last is not None:
                    out.append(now - last)
                last = now


def one_round(url: str, n_stops: int) -> float:
    """The neighbour's median ms per token while a request with ``n_stops`` stop strings runs beside it."""
    base = {"prompt": "Once upon a time", "max_tokens": TOKENS, "ignore_eos": True, "temperature": 0,
            "stream": True}
    heavy = {**base, "stop": [f"never-{k}-seen" for k in range(n_stops)]} if n_stops else base
    gaps: list[float] = []
    other = threading.Thread(target=stream_gaps, args=(url, heavy, []))
    other.start()
    time.sleep(0.2)  # the heavy request is running before the neighbour starts
    stream_gaps(url, {**base, "max_tokens": TOKENS // 2}, gaps)
    other.join()
    return statistics.median(gaps) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--counts", default="0,10,1000,100000")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    llm = gemmakit.load()
    limits = ServerLimits(max_stop=max(counts + [1]), max_body_bytes=64 << 20)
    results: dict[int, list[float]] = {n: [] for n in counts}
    with Server(create_app(llm, limits=limits)) as server:
        one_round(server.url, 0)  # warm-up
        for _ in range(args.rounds):
            for n in counts:
                results[n].append(one_round(server.url, n))
    base = statistics.median(results[counts[0]])
    print(f"{'stop strings':>12}  {'neighbour ms/token (median of rounds)':>38}  {'vs first':>8}")
    for n in counts:
        ms = statistics.median(results[n])
        print(f"{n:>12}  {ms:>38.1f}  {ms / base:>7.2f}x")


if __name__ == "__main__":
    main()
