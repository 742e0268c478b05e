"""gemmakit vs llama.cpp (llama-cpp-python) on the same GGUF, same thread count, alternating runs.

    python benchmarks/vs_llamacpp.py [--model PATH.gguf] [--threads 2] [--rounds 3] [--prompt-tokens 512]

Each round starts one fresh process per engine (A then B), so load time and peak RSS are each engine's own.
load_s is the load call plus the first token (after the libraries are imported); import_s is the import alone
(PyTorch's import, about 2 s here, dominates gemmakit's).
Prints the median of every figure and the ratio gemmakit / llama.cpp (for load time and RSS, lower is better;
for tok/s, higher is better).

llama-cpp-python compiles llama.cpp from source (15-30 minutes on 2 cores); install it into the same venv:
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

TEXT = ("The history of computing is a story of people finding ways to make machines do arithmetic faster and "
        "more reliably. Early mechanical calculators gave way to relays, vacuum tubes and transistors. ")

GEMMAKIT = r"""
import json, resource, sys, time
sys.path.insert(0, {src!r})
t0 = time.perf_counter()
import torch, gemmakit
from gemmakit.generate import decode_step, prefill
from gemmakit.kv_cache import KVCache
from gemmakit.sampling import argmax
imports = time.perf_counter() - t0
t0 = time.perf_counter()
llm = gemmakit.load({model!r}, threads={threads})
ids = llm.tokenizer.encode({text!r} * 64, add_bos=True)[:{n_prompt}]
first = llm.generate(ids[:8], max_tokens=1, temperature=0)  # load + first token
load = time.perf_counter() - t0
cache = KVCache(llm.config, 1, len(ids) + {n_decode} + 1)
t = time.perf_counter(); logits = prefill(llm.model, ids, cache); pre = time.perf_counter() - t
tok, pos = argmax(logits), len(ids)
t = time.perf_counter()
for _ in range({n_decode}):
    logits = decode_step(llm.model, tok, pos, cache); tok, pos = argmax(logits), pos + 1  # greedy, as llm.sample(temp=0)
dec = time.perf_counter() - t
print(json.dumps(dict(import_s=imports, load_s=load, rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      prefill_tok_s=len(ids) / pre, decode_tok_s={n_decode} / dec)))
"""

LLAMACPP = r"""
import json, resource, time
t0 = time.perf_counter()
from llama_cpp import Llama
imports = time.perf_counter() - t0
t0 = time.perf_counter()
llm = Llama(model_path={model!r}, n_ctx={n_ctx}, n_threads={threads}, n_threads_batch={threads}, n_batch=512,
            verbose=False)
ids = llm.tokenize(({text!r} * 64).encode(), add_bos=True)[:{n_prompt}]
llm.eval(ids[:8]); llm.sample(temp=0)  # load + first token
load = time.perf_counter() - t0
llm.reset()
t = time.perf_counter(); llm.eval(ids); pre = time.perf_counter() - t
tok = llm.sample(temp=0)
t = time.perf_counter()
for _ in range({n_decode}):
    llm.eval([tok]); tok = llm.sample(temp=0)
dec = time.perf_counter() - t
print(json.dumps(dict(import_s=imports, load_s=load, rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      prefill_tok_s=len(ids) / pre, decode_tok_s={n_decode} / dec)))
"""


def run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    args = ap.parse_args()
    sys.path.insert(0, str(SRC))
    import gemmakit

    model = args.model or str(gemmakit.default_model_path())
    fmt = dict(model=model, threads=args.threads, text=TEXT, n_prompt=args.prompt_tokens,
               n_decode=args.decode_tokens, n_ctx=args.prompt_tokens + args.decode_tokens + 16, src=str(SRC))
    results: dict[str, list[dict]] = {"gemmakit": [], "llama.cpp": []}
    for r in range(args.rounds):
        results["gemmakit"].append(run(GEMMAKIT.format(**fmt)))
        results["llama.cpp"].append(run(LLAMACPP.format(**fmt)))
        print(f"round {r + 1}: gemmakit {results['gemmakit'][-1]}  llama.cpp {results['llama.cpp'][-1]}",
              file=sys.stderr)
    print(f"model {Path(model).name}, {args.threads} threads, {args.rounds} alternating rounds, medians:")
    print(f"{'figure':<16}{'gemmakit':>12}{'llama.cpp':>12}{'ratio':>9}")
    for key in ("decode_tok_s", "prefill_tok_s", "load_s", "import_s", "rss_mib"):
        a = statistics.median(x[key] for x in results["gemmakit"])
        b = statistics.median(x[key] for x in results["llama.cpp"])
        print(f"{key:<16}{a:>12.2f}{b:>12.2f}{a / b:>9.2f}")


if __name__ == "__main__":
    main()
