"""Constrained decoding: what it costs and how often the answer is valid, gemmakit beside llama.cpp (#13).

1. Decode throughput through the engine on the default model, constrained (a JSON schema that makes long
   answers) vs unconstrained, at 1 and 16 streams: the two take turns over several rounds; medians and ratios.
2. Mask time per token on the 262k vocabulary (p50 / p99), over the tokens of real constrained answers.
3. Compile time: each test schema to a checked grammar and a first matcher (plus the one-off vocabulary build).
4. If llama-cpp-python is installed: its ``response_format`` with a ``schema`` (llama.cpp's JSON-schema-to-GBNF
   grammar) on the same GGUF and the same schemas, greedy, one stream at a time, side by side with gemmakit:
   tok/s and how many answers parse and validate (jsonschema).

    python benchmarks/structured.py [--rounds 3] [--tokens 128] [--parts compile,masks,throughput,llamacpp]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jsonschema
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

import gemmakit  # noqa: E402
from gemmakit import SamplingParams  # noqa: E402
from gemmakit.engine import Engine  # noqa: E402
from gemmakit.generate import collect  # noqa: E402
from gemmakit.structured.vocab import ll_tokenizer  # noqa: E402
from test_structured import SCHEMAS  # noqa: E402

LONG = {"type": "array", "maxItems": 200, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "city", "age"],
    "properties": {"name": {"type": "string", "maxLength": 24}, "city": {"type": "string", "maxLength": 24},
                   "age": {"type": "integer", "minimum": 0, "maximum": 120}}}}
MESSAGES = [{"role": "user", "content": "List people with their city and age as JSON."}]


TEXT = "[A-Za-z ,.]*"  # forces nothing, allows most of the vocabulary: the mask and its application alone


def throughput(llm, engine, streams: int, constraint: dict, tokens: int) -> float:
    """Generated tokens per second for ``streams`` requests at once under ``constraint`` (plan_chat's kwargs)."""
    ids, plan = llm.plan_chat(MESSAGES, **constraint)
    params = [SamplingParams(temperature=0.7, seed=s, max_tokens=tokens, ignore_eos=True) for s in range(streams)]
    start = time.perf_counter()
    handles = [engine.submit(ids, p, rules=plan.rules) for p in params]
    done = [collect(iter(h), len(ids), False) for h in handles]
    elapsed = time.perf_counter() - start
    generated = sum(len(c.token_ids) for c in done)
    return generated / elapsed


def part_throughput(llm, rounds: int, tokens: int) -> None:
    engine = Engine(llm.model, llm.tokenizer, llm.stop_token_ids, 1024, max_batch=16)
    try:
        throughput(llm, engine, 1, {"response_format": LONG}, 8)  # warm-up: kernels, first matcher
        cases = {"JSON schema": {"response_format": LONG}, "text regex": {"regex": TEXT}}
        for streams in (1, 16):
            runs: dict[str, list[float]] = {"free": [], **{name: [] for name in cases}}
            for _ in range(rounds):  # the cases take turns
                runs["free"].append(throughput(llm, engine, streams, {}, tokens))
                for name, constraint in cases.items():
                    runs[name].append(throughput(llm, engine, streams, constraint, tokens))
            free = statistics.median(runs["free"])
            line = f"{streams:2d} streams: unconstrained {free:6.1f} tok/s"
            for name in cases:
                held = statistics.median(runs[name])
                ratios = ", ".join(f"{b / a:.2f}" for a, b in zip(runs["free"], runs[name]))
                line += f"; {name} {held:6.1f} tok/s, ratio {held / free:.2f} ({ratios})"
            print(line)
    finally:
        engine.shutdown()


def part_masks(llm) -> None:
    """Time one mask per token over greedy answers to each test schema (the mask the engine computes beside
    the forward)."""
    times = []
    for schema in SCHEMAS.values():
        c = llm.chat(MESSAGES, response_format=schema, temperature=0, max_tokens=64)
        rules = llm.output_rules(response_format=schema)
        constraint = rules.constraint(llm.tokenizer, llm.stop_token_ids, llm.config.vocab_size)
        row = torch.full(((llm.config.vocab_size + 31) // 32,), -1, dtype=torch.int32)
        for token in c.token_ids:
            start = time.perf_counter()
            constraint.fill(row)
            times.append(time.perf_counter() - start)
            constraint.accept(token)
    times.sort()
    p = lambda q: times[min(len(times) - 1, int(q * len(times)))] * 1e6  # noqa: E731
    print(f"mask per token ({len(times)} tokens, vocab {llm.config.vocab_size}): p50 {p(0.5):.0f} us, "
          f"p99 {p(0.99):.0f} us, max {times[-1] * 1e6:.0f} us")


def part_compile(llm) -> None:
    start = time.perf_counter()
    ll_tokenizer(llm.tokenizer)
    print(f"vocabulary for llguidance (once per model): {time.perf_counter() - start:.2f} s")
    times = []
    for schema in SCHEMAS.values():
        start = time.perf_counter()
        rules = llm.output_rules(response_format=schema)
        rules.constraint(llm.tokenizer, llm.stop_token_ids, llm.config.vocab_size).allowed()
        times.append(time.perf_counter() - start)
    print(f"schema -> checked grammar + first mask ({len(times)} schemas): median {statistics.median(times) * 1e3:.1f}"
          f" ms, max {max(times) * 1e3:.1f} ms")


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def part_llamacpp(llm, tokens: int) -> None:
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed: skipping the side-by-side run")
        return
    ref = Llama(str(gemmakit.default_model_path()), n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False)
    rows = {"gemmakit": [0, 0, 0, 0.0], "llama.cpp": [0, 0, 0, 0.0]}  # valid, stopped, tokens, seconds
    invalid: dict[str, list[str]] = {"gemmakit": [], "llama.cpp": []}
    for name, schema in SCHEMAS.items():
        start = time.perf_counter()
        try:
            r = ref.create_chat_completion(MESSAGES, response_format={"type": "json_object", "schema": schema},
                                           temperature=0, max_tokens=tokens)
            text, finish, n = (r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"],
                               r["usage"]["completion_tokens"])
        except Exception as exc:  # llama.cpp's converter refuses some schemas
            print(f"  llama.cpp failed on {name}: {type(exc).__name__}: {str(exc)[:80]}")
            text, finish, n = "", "error", 0
        ref_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = llm.chat(MESSAGES, response_format=schema, temperature=0, max_tokens=tokens)
        our_s = time.perf_counter() - start
        for key, (t, f, k, s) in (("llama.cpp", (text, finish, n, ref_s)),
                                  ("gemmakit", (ours.text, ours.finish_reason, len(ours.token_ids), our_s))):
            row = rows[key]
            if not valid(t, schema):
                invalid[key].append(f"{name} ({f})")
            row[0] += valid(t, schema)
            row[1] += f == "stop"
            row[2] += k
            row[3] += s
    for key, (ok, stopped, n, s) in rows.items():
        print(f"{key:9s}: {ok}/{len(SCHEMAS)} valid, {stopped} stopped, {n / s:.1f} tok/s over {n} tokens "
              "(one stream, greedy, prompt included in the time)")
        print(f"           not valid: {', '.join(invalid[key]) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--parts", default="compile,masks,throughput,llamacpp")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    llm = gemmakit.load()
    print(f"gemmakit {gemmakit.__version__}, torch threads {torch.get_num_threads()}")
    if "compile" in parts:
        part_compile(llm)
    if "masks" in parts:
        part_masks(llm)
    if "throughput" in parts:
        part_throughput(llm, args.rounds, args.tokens)
    if "llamacpp" in parts:
        part_llamacpp(llm, args.tokens)


if __name__ == "__main__":
    main()
