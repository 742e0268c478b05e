"""Load test: N concurrent streaming clients against `gemmakit serve` (and llama.cpp's servers).

Each round starts N clients at once; each streams one completion of --max-tokens tokens for its own prompt. Per round: aggregate output tok/s (all completion tokens / wall time of the round), time to first
token p50 / p99, and errors (any non-200, broken stream or missing [DONE]). Requests ask ignore_eos, so every
client generates exactly --max-tokens tokens (servers that do not know the field generate until EOS).

    python benchmarks/serve_load.py                      # gemmakit, clients 1 4 16 64
    python benchmarks/serve_load.py --target both        # also llama-cpp-python's server (pip install
                                                         # 'llama-cpp-python[server]==0.3.36')
    python benchmarks/serve_load.py --target gemmakit,llama-server --llama-server PATH/llama-server

llama-cpp-python's server runs one request at a time (it has no parallel slots), so its figures show what a
single-slot server does under the same load. `llama-server` is llama.cpp's own server, with --max-batch parallel
slots and continuous batching (each slot gets --context-length tokens); build it from the llama.cpp sources that
ship in llama-cpp-python's sdist:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B llama-build -DCMAKE_BUILD_TYPE=Release \
          -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
    cmake --build llama-build --target llama-server -j2        # ~10 minutes on 2 cores

With several targets, each round runs every client level on every target in turn (servers started once, kept
up side by side but only one under load at a time), so a noisy moment of the machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

TOPICS = ["the sea", "a robot", "winter", "a library", "the moon", "a garden", "trains", "a lost key", "music",
          "a city at night", "mountains", "an old map", "rain", "a lighthouse", "bread", "a clock"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONTEXT = 2048  # tokens per sequence (per slot)
TARGETS = ("gemmakit", "llamacpp", "llama-server")


def server_command(target: str, args: argparse.Namespace, port: int) -> list[str]:
    if target == "gemmakit":
        return [sys.executable, "-m", "gemmakit.cli", "serve", "--model", args.model, "--port", str(port),
                "--threads", str(args.threads), "--max-batch", str(args.max_batch), "--max-waiting", "256",
                "--context-length", str(CONTEXT), "--kv-cache-mib", str(args.kv_cache_mib), "--model-name", "bench",
                "--decode-x-bits", str(getattr(args, "decode_x_bits", 16))]
    if target == "llamacpp":
        return [sys.executable, "-m", "llama_cpp.server", "--model", args.model, "--host", "127.0.0.1", "--port",
                str(port), "--n_threads", str(args.threads), "--n_ctx", str(CONTEXT), "--model_alias", "bench"]
    if args.llama_server is None:
        raise SystemExit("--target llama-server needs --llama-server PATH (see the top of this file)")
    # --max-batch slots, continuous batching, CONTEXT tokens per slot, as gemmakit's rows.
    return [args.llama_server, "--model", args.model, "--host", "127.0.0.1", "--port", str(port), "--threads",
            str(args.threads), "--threads-batch", str(args.threads), "--parallel", str(args.max_batch),
            "--cont-batching", "--ctx-size", str(CONTEXT * args.max_batch), "--alias", "bench"]


def start(target: str, args: argparse.Namespace, extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start a server (``extra``: more command-line arguments) and wait until it answers."""
    port = free_port()
    cmd = server_command(target, args, port) + (extra or [])
    log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads would fill up and stall a chatty server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{target} server exited: {log.read()[-2000:]}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{target} server did not start")


def one_client(client: httpx.Client, url: str, i: int, max_tokens: int, sampling: dict | None = None) -> dict:
    # A plain completion: the bundled model is a base model, and a chat turn may end at once on servers that
    # cannot be told to ignore end-of-sequence. Greedy unless `sampling` says otherwise.
    body = {"model": "bench", "stream": True, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "prompt": f"Here is a short story about {TOPICS[i % len(TOPICS)]}.\n\n",
            "stream_options": {"include_usage": True}, **(sampling or {})}
    start = time.perf_counter()
    first, tokens, done = None, 0, False
    try:
        with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}"}
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"].get("message", "error event")}
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = first or time.perf_counter()
                    tokens += 1  # one chunk per token; replaced by the exact count when the server reports usage
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return {"error": type(exc).__name__}
    if not done:
        return {"error": "stream ended without [DONE]"}
    return {"ttft": (first or time.perf_counter()) - start, "tokens": tokens}


def run_round(url: str, clients: int, max_tokens: int, sampling: dict | None = None) -> dict:
    # One HTTP client for all the round's threads, made before the clock starts: creating an httpx client takes
    # ~30 ms of Python, which 16 threads creating their own would serialize into the round (and into TTFT).
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(limits=limits) as client, concurrent.futures.ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda i: one_client(client, url, i, max_tokens, sampling), range(clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft"] for r in ok)

    def pct(q: float) -> float:
        return ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else float("nan")

    return {"clients": clients, "tok_s": sum(r["tokens"] for r in ok) / wall, "ttft_p50": statistics.median(ttfts)
            if ttfts else float("nan"), "ttft_p99": pct(0.99), "errors": len(results) - len(ok),
            "error_kinds": sorted({r["error"] for r in results if "error" in r})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF path (default: the bundled Gemma 3 270M)")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=16, help="gemmakit's cache rows, llama-server's slots")
    ap.add_argument("--target", default="gemmakit",
                    help=f"comma-separated, of {', '.join(TARGETS)}; 'both' is gemmakit,llamacpp")
    ap.add_argument("--kv-cache-mib", type=int, default=4096,
                    help="gemmakit's KV cache budget (a row of 2048 tokens of the default model is ~32 MiB)")
    ap.add_argument("--llama-server", help="path of llama.cpp's llama-server binary")
    ap.add_argument("--sampling", type=json.loads, default=None,
                    help='request fields for sampled runs, e.g. \'{"temperature": 0.8, "top_k": 0, "top_p": 1}\' '
                         '(default: greedy)')
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the client levels; print medians, and each ratio as the median of the rounds' "
                         "own ratios (this machine is shared and noisy)")
    args = ap.parse_args()
    if args.model is None:
        from gemmakit import default_model_path

        args.model = str(default_model_path())
    targets = ["gemmakit", "llamacpp"] if args.target == "both" else args.target.split(",")
    if unknown := set(targets) - set(TARGETS):
        ap.error(f"unknown target(s) {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}")
    table: dict[tuple[str, int], list[dict]] = {}
    levels = [int(c) for c in args.clients.split(",")]
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for target in targets:
            servers[target] = start(target, args)
            run_round(servers[target][1], 1, 8)  # warm-up
        for r in range(args.rounds):
            for n in levels:
                for target in targets:  # the targets take turns at each level
                    row = run_round(servers[target][1], n, args.max_tokens, args.sampling)
                    table.setdefault((target, n), []).append(row)
                    print(f"{target:12s} round {r + 1} clients={n:3d}  {row['tok_s']:7.1f} tok/s  TTFT p50 "
                          f"{row['ttft_p50']:6.2f} s  p99 {row['ttft_p99']:6.2f} s  errors {row['errors']} "
                          f"{row['error_kinds'] or ''}", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    print(f"medians over {args.rounds} round(s), {args.max_tokens} tokens per request:")
    for (target, n), rows in sorted(table.items(), key=lambda item: (TARGETS.index(item[0][0]), item[0][1])):
        med = {k: statistics.median(row[k] for row in rows) for k in ("tok_s", "ttft_p50", "ttft_p99")}
        print(f"{target:12s} clients={n:3d}  {med['tok_s']:7.1f} tok/s  TTFT p50 {med['ttft_p50']:6.2f} s  "
              f"p99 {med['ttft_p99']:6.2f} s  errors {sum(row['errors'] for row in rows)}")

    def ratio(rows: list[dict], base: list[dict]) -> str:
        ratios = [row["tok_s"] / other["tok_s"] for row, other in zip(rows, base)]
        return f"{statistics.median(ratios):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in ratios)})"

    for target in targets:
        singles = table.get((target, 1))
        for n in levels:
            if singles and n > 1:
                print(f"{target} {n} clients / 1 client: {ratio(table[(target, n)], singles)}")
    for other in targets:
        if other != "gemmakit" and "gemmakit" in targets:
            for n in levels:
                print(f"gemmakit / {other} at {n} clients: {ratio(table[('gemmakit', n)], table[(other, n)])}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
