"""What the safety layer costs and how well its built-in guards do.

    python benchmarks/safety.py [--model PATH.gguf] [--threads 2] [--rounds 3] [--tokens 128] [--parts quality,speed]
                                [--window 64]

quality: precision and recall of the built-in guards on the labelled sets below (PII items by kind and exact text;
     the classifier by text: flagged or not, against the label), and the moderation latency of a short text
     (median of 50 calls to Safety.moderate, guards warm).
speed: two `gemmakit serve` processes of the same model, guards off and guards on (the built-in guards on input
     and output: pii redacted on input and flagged on output, the classifier blocking), measured in turns: each
     round runs 1 and 16 streamed clients (benchmarks/serve_load.py's, --tokens tokens each, greedy) against one,
     then the other. Prints tok/s and TTFT medians and the ratios guards on / guards off. A streamed answer with
     output guards goes out a checked window (--window characters) at a time, which is most of the added TTFT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (benchmarks/ is not a package)

POLICY = """
[input]
guards = ["pii", "classifier"]
action = "block"
[input.actions]
pii = "redact"
[output]
guards = ["pii", "classifier"]
action = "block"
[output.actions]
pii = "flag"
"""

LABELLED = Path(__file__).resolve().parent.parent / "tests" / "data" / "safety_labelled.json"


def labelled() -> dict:
    """The labelled sets tests/test_safety.py checks: pii items (kind, exact text) and texts harmful or not."""
    data = json.loads(LABELLED.read_text(encoding="utf-8"))
    return {"pii": [(t, [tuple(x) for x in items]) for t, items in data["pii"]], "classifier": data["classifier"]}


def pii_quality() -> None:
    from gemmakit.safety import PIIGuard

    guard = PIIGuard()
    guard.warm_up()
    kinds: dict[str, dict[str, int]] = {}
    for text, expected in labelled()["pii"]:
        found = {(s.kind, text[s.start:s.end]) for s in guard.find(text)}
        want = set(expected)
        for kind in {k for k, _ in found | want}:
            c = kinds.setdefault(kind, {"tp": 0, "fp": 0, "fn": 0})
            c["tp"] += len({x for x in found & want if x[0] == kind})
            c["fp"] += len({x for x in found - want if x[0] == kind})
            c["fn"] += len({x for x in want - found if x[0] == kind})
    total = {k: sum(c[k] for c in kinds.values()) for k in ("tp", "fp", "fn")}
    for kind, c in sorted(kinds.items()) + [("all", total)]:
        print(f"pii {kind:7s} precision {_ratio(c['tp'], c['tp'] + c['fp'])}  recall {_ratio(c['tp'], c['tp'] + c['fn'])}"
              f"  (tp {c['tp']}, fp {c['fp']}, fn {c['fn']})")


def classifier_quality() -> None:
    from gemmakit.safety import Safety

    safety = Safety()
    tp = fp = fn = 0
    texts = labelled()["classifier"]
    for text, harmful in texts:
        flagged = any(v for c, v in safety.moderate(text)["categories"].items() if c != "pii")
        tp, fp, fn = tp + (flagged and harmful), fp + (flagged and not harmful), fn + (harmful and not flagged)
        if flagged != harmful:
            print(f"  classifier {'false positive' if flagged else 'missed'}: {text!r}")
    print(f"classifier precision {_ratio(tp, tp + fp)}  recall {_ratio(tp, tp + fn)}  (tp {tp}, fp {fp}, fn {fn}; "
          f"{len(texts)} texts)")
    times = []
    for _ in range(50):
        start = time.perf_counter()
        safety.moderate("Could you please call me back at +1 (415) 555-2671 about the invoice?")
        times.append(time.perf_counter() - start)
    print(f"moderation of a short text (pii + classifier): median {statistics.median(times) * 1000:.1f} ms, "
          f"max {max(times) * 1000:.1f} ms")


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.3f}" if b else "  -  "


def speed(args: argparse.Namespace) -> None:
    args.max_batch, args.kv_cache_mib, args.decode_x_bits = 16, 1024, 16
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(POLICY)
    servers = {"off": serve_load.start("gemmakit", args),
               "on": serve_load.start("gemmakit", args, extra=["--safety", f.name, "--safety-window",
                                                               str(args.window)])}
    rows: dict[tuple[str, int], list[dict]] = {}
    try:
        for _, url in servers.values():
            serve_load.run_round(url, 4, 8)  # warm-up
        for r in range(args.rounds):
            for clients in (1, 16):
                for name in ("off", "on"):
                    row = serve_load.run_round(servers[name][1], clients, args.tokens)
                    if row["errors"]:
                        raise SystemExit(f"guards {name}: {row['errors']} errors {row['error_kinds']}")
                    rows.setdefault((name, clients), []).append(row)
                    print(f"round {r + 1} guards {name:3s} clients={clients:2d}: {row['tok_s']:6.1f} tok/s, TTFT p50 "
                          f"{row['ttft_p50'] * 1000:6.0f} ms", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    for clients in (1, 16):
        off, on = rows[("off", clients)], rows[("on", clients)]
        ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(off, on)]
        ttft = [(b["ttft_p50"] - a["ttft_p50"]) * 1000 for a, b in zip(off, on)]
        print(f"{clients:2d} clients: guards off {statistics.median(r['tok_s'] for r in off):6.1f} tok/s, on "
              f"{statistics.median(r['tok_s'] for r in on):6.1f} tok/s; on / off {statistics.median(ratios):.3f}x "
              f"(rounds: {', '.join(f'{x:.3f}' for x in ratios)}); added TTFT p50 {statistics.median(ttft):.0f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF path (default: the bundled Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--parts", default="quality,speed")
    ap.add_argument("--window", type=int, default=64, help="the guarded server's --safety-window (characters)")
    args = ap.parse_args()
    if args.model is None:
        from gemmakit import default_model_path

        args.model = str(default_model_path())
    parts = args.parts.split(",")
    if "quality" in parts:
        pii_quality()
        classifier_quality()
    if "speed" in parts:
        speed(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
