"""Batch jobs: throughput of a batch against the same requests one by one, and what a running batch does to an
interactive request's time to first token.

    python benchmarks/batch.py [--model PATH.gguf] [--threads 2] [--requests 200] [--tokens 32] [--probes 5]

throughput: N requests sharing a ~500-token instruction (different questions after it), answered by
    `gemmakit batch` (continuous batching, in-process) with the prefix cache and without (--no-prefix-cache), and
    by the same requests sent one at a time to `gemmakit serve`; requests/s and generated tok/s of each.
interactive: one `gemmakit serve --data-dir` with --max-batch 8; the time to first token of a streamed interactive
    request (median of --probes), idle, then while a batch of --requests runs through /v1/batches, then idle again.
    Target (issue 16): busy <= 2x idle.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (benchmarks/ is not a package)

INSTRUCTION = ("You are a careful assistant for a library catalogue. " * 50).strip()  # ~500 tokens


def batch_lines(n: int, tokens: int) -> list[str]:
    return [json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions",
                        "body": {"prompt": f"{INSTRUCTION}\n\nQuestion {i}: what is book {i} about?\nAnswer:",
                                 "max_tokens": tokens, "temperature": 0, "ignore_eos": True}})
            for i in range(n)]


def run_batch_cli(args: argparse.Namespace, lines: list[str], extra: list[str]) -> float:
    """Seconds `gemmakit batch` takes for ``lines`` (loading the model, ~2 s, included)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.jsonl"
        source.write_text("\n".join(lines) + "\n")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gemmakit.cli", "batch", str(source), "-o", str(Path(tmp) / "out.jsonl"),
                        "-q", "--model", args.model, "--threads", str(args.threads), "--max-batch", "16",
                        "-c", "1024", *extra], check=True, capture_output=True)
        return time.perf_counter() - start


def throughput(args: argparse.Namespace, lines: list[str]) -> None:
    batch_s = run_batch_cli(args, lines, [])
    uncached_s = run_batch_cli(args, lines, ["--no-prefix-cache"])
    proc, url = serve_load.start("gemmakit", args)
    try:
        start = time.perf_counter()
        for line in lines:
            httpx.post(url + "/v1/completions", json=json.loads(line)["body"], timeout=600).raise_for_status()
        serial_s = time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    n, tokens = len(lines), len(lines) * args.tokens
    print(f"throughput: gemmakit batch {n / batch_s:.2f} req/s ({tokens / batch_s:.0f} tok/s, model load included); "
          f"without the prefix cache {n / uncached_s:.2f} req/s ({uncached_s / batch_s:.2f}x slower); one by one "
          f"through the server (cache on) {n / serial_s:.2f} req/s ({serial_s / batch_s:.2f}x slower)", flush=True)


def ttft(url: str) -> float:
    body = {"prompt": "Tell me about the sea.", "max_tokens": 4, "temperature": 0, "stream": True}
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - start
    raise RuntimeError("no token came back")


def probes(url: str, n: int) -> float:
    values = []
    for _ in range(n):
        values.append(ttft(url))
        time.sleep(0.3)
    return statistics.median(values)


def interactive(args: argparse.Namespace, lines: list[str]) -> None:
    args.max_batch = 8
    with tempfile.TemporaryDirectory() as data:
        proc, url = serve_load.start("gemmakit", args, extra=["--data-dir", data])
        try:
            idle = probes(url, args.probes)
            files = {"file": ("in.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode()))}
            uploaded = httpx.post(url + "/v1/files", files=files, data={"purpose": "batch"}, timeout=60).json()
            batch = httpx.post(url + "/v1/batches", timeout=60, json={
                "input_file_id": uploaded["id"], "endpoint": "/v1/completions", "completion_window": "24h"}).json()
            while httpx.get(f"{url}/v1/batches/{batch['id']}").json()["request_counts"]["completed"] < 2:
                time.sleep(0.2)
            busy = probes(url, args.probes)
            state = httpx.get(f"{url}/v1/batches/{batch['id']}").json()
            httpx.post(f"{url}/v1/batches/{batch['id']}/cancel")
            while httpx.get(f"{url}/v1/batches/{batch['id']}").json()["status"] != "cancelled":
                time.sleep(0.2)
            idle_after = probes(url, args.probes)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    base = statistics.mean([idle, idle_after])
    print(f"interactive TTFT: idle {idle * 1000:.0f} / {idle_after * 1000:.0f} ms, while the batch ran "
          f"{busy * 1000:.0f} ms ({busy / base:.2f}x idle; the batch had {state['request_counts']['completed']} of "
          f"{state['request_counts']['total']} done when the probes ended)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF path (default: the bundled Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--probes", type=int, default=5)
    ap.add_argument("--parts", default="throughput,interactive")
    args = ap.parse_args()
    if args.model is None:
        from gemmakit import default_model_path

        args.model = str(default_model_path())
    args.max_batch, args.kv_cache_mib = 16, 1024
    lines = batch_lines(args.requests, args.tokens)
    if "throughput" in args.parts:
        throughput(args, lines)
    if "interactive" in args.parts:
        interactive(args, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
