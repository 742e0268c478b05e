"""What sampling costs: sampled decode against greedy decode, one stream and through the server.

    python benchmarks/sampling.py [--model PATH.gguf] [--threads 2] [--rounds 3] [--tokens 128] [--parts one,server]
                               [--decode-x-bits 16|8]

one: one process per run, greedy and sampled (temperature 0.8 over the full vocabulary: top_k 0, top_p 1)
     alternating, each generating --tokens tokens through the Python API (ignore_eos); decode tok/s excludes the
     first token. Prints medians and the median of the pairs' ratios sampled / greedy.
server: one `gemmakit serve` (--decode-x-bits 16 or 8; see gemmakit.quant.linear.set_decode_x_bits); each round
     runs 1 sampled stream, 16 sampled streams and 16 greedy streams (benchmarks/serve_load.py's clients, --tokens
     tokens each) and prints the medians and the ratios 16 sampled / 1 sampled and 16 sampled / 16 greedy.
The reference point is the same engine greedy: sampling should cost next to nothing beside the forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (benchmarks/ is not a package)

SRC = Path(__file__).resolve().parent.parent / "src"
SAMPLED = {"temperature": 0.8, "top_k": 0, "top_p": 1.0}
GREEDY = {"temperature": 0.0}

ONE = r"""
import json, sys
sys.path.insert(0, {src!r})
import gemmakit
llm = gemmakit.load({model!r}, threads={threads})
prompt = "Here is a short story about a lighthouse.\n\n"
llm.generate(prompt, max_tokens=8, ignore_eos=True, **{knobs!r})  # warm-up
out = llm.generate(prompt, max_tokens={tokens}, ignore_eos=True, seed=1, **{knobs!r})
t = out.timings
print(json.dumps(dict(decode_tok_s=(len(out.token_ids) - 1) / (t["total_s"] - t["first_token_s"]))))
"""


def run_one(args: argparse.Namespace, knobs: dict) -> float:
    code = ONE.format(src=str(SRC), model=args.model, threads=args.threads, knobs=knobs, tokens=args.tokens)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["decode_tok_s"]


def one_stream(args: argparse.Namespace) -> None:
    greedy, sampled = [], []
    for r in range(args.rounds):
        greedy.append(run_one(args, GREEDY))
        sampled.append(run_one(args, SAMPLED))
        print(f"round {r + 1}: greedy {greedy[-1]:.1f} tok/s, sampled {sampled[-1]:.1f} tok/s "
              f"({sampled[-1] / greedy[-1]:.3f}x)", flush=True)
    ratios = [s / g for s, g in zip(sampled, greedy)]
    print(f"one stream: greedy {statistics.median(greedy):.1f} tok/s, sampled {statistics.median(sampled):.1f} "
          f"tok/s; sampled / greedy {statistics.median(ratios):.3f}x (pairs: {', '.join(f'{x:.3f}' for x in ratios)})")


def server(args: argparse.Namespace) -> None:
    args.max_batch, args.kv_cache_mib = 16, 1024
    proc, url = serve_load.start("gemmakit", args)
    rows: dict[str, list[float]] = {"1 sampled": [], "16 sampled": [], "16 greedy": []}
    try:
        serve_load.run_round(url, 4, 8, SAMPLED)  # warm-up
        for r in range(args.rounds):
            for name, clients, knobs in (("1 sampled", 1, SAMPLED), ("16 sampled", 16, SAMPLED),
                                         ("16 greedy", 16, GREEDY)):
                row = serve_load.run_round(url, clients, args.tokens, knobs)
                if row["errors"]:
                    raise SystemExit(f"{name}: {row['errors']} errors {row['error_kinds']}")
                rows[name].append(row["tok_s"])
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rows.items()), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    def ratio(a: str, b: str) -> str:
        pairs = [x / y for x, y in zip(rows[a], rows[b])]
        return f"{statistics.median(pairs):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in pairs)})"

    print("server medians: " + ", ".join(f"{k} {statistics.median(v):.1f} tok/s" for k, v in rows.items()))
    print(f"16 sampled / 1 sampled: {ratio('16 sampled', '1 sampled')}")
    print(f"16 sampled / 16 greedy: {ratio('16 sampled', '16 greedy')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF path (default: the bundled Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--parts", default="one,server")
    ap.add_argument("--decode-x-bits", type=int, default=16, choices=[16, 8], help="the server's (default 16)")
    args = ap.parse_args()
    if args.model is None:
        sys.path.insert(0, str(SRC))
        from gemmakit import default_model_path

        args.model = str(default_model_path())
    parts = args.parts.split(",")
    if "one" in parts:
        one_stream(args)
    if "server" in parts:
        server(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
