"""A full-size E2B-shaped Hugging Face folder (random bf16 safetensors) loaded with ``quant="int4"``, against the
GGUF that ``gemmakit quantize --type Q4_1`` writes from the same folder (the same weights: their logits must be
equal). Alternating fresh processes: load time, peak RSS, decode tok/s.

    python benchmarks/hf_int4.py [--dir /tmp/e2b-hf] [--rounds 2] [--threads 2] [--keep]

Writes ~9 GB of safetensors (streamed shard by shard, never held in memory) and a ~3 GB GGUF; needs no llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
SHARD_BYTES = 2 << 30

MEASURE = r"""
import json, re, sys, time
t0 = time.perf_counter()
import torch, gemmakit
llm = gemmakit.load(sys.argv[1], quant=sys.argv[2], threads=int(sys.argv[3]))
load = time.perf_counter() - t0
ids = list(range(1000, 1016))
first = llm.logits(ids)[-1]
t = time.perf_counter()
out = llm.generate(ids, max_tokens=32, temperature=0, ignore_eos=True)
decode = len(out.token_ids) / (time.perf_counter() - t)
hwm = int(re.findall(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())[0]) / 1024
print(json.dumps(dict(load_s=load, rss_mib=hwm, decode_tok_s=decode, first=first[:8].tolist(),
                      tokens=out.token_ids)))
"""


def e2b_config():
    from transformers import Gemma4TextConfig

    types = (["sliding_attention"] * 4 + ["full_attention"]) * 7
    return Gemma4TextConfig(vocab_size=262144, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
                            num_attention_heads=8, num_key_value_heads=1, head_dim=256, global_head_dim=512,
                            layer_types=types, sliding_window=512, hidden_size_per_layer_input=256,
                            vocab_size_per_layer_input=262144, num_kv_shared_layers=20, use_double_wide_mlp=True,
                            final_logit_softcapping=30.0, max_position_embeddings=131072,
                            architectures=["Gemma4ForCausalLM"])


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if not name.startswith("lm_head")}


def values(name: str, shape: tuple[int, ...], pool: np.ndarray, turn: int) -> np.ndarray:
    """bf16 bits (uint16) for a tensor: norms and scalars near 1, matrices from a rotated random pool."""
    n = math.prod(shape)
    if name.endswith(("norm.weight", "layer_scalar")):
        x = (1.0 + np.resize(np.roll(pool, turn), n) * 5).astype(np.float32)
    else:
        x = np.resize(np.roll(pool, turn), n)
    return (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation to bf16 is fine for random weights


def write_folder(folder: Path) -> None:
    """config.json, a tokenizer.json, and safetensors shards written tensor by tensor (safetensors' layout: an
    8-byte header length, a JSON header of dtypes, shapes and offsets, then the raw data)."""
    config = e2b_config()
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    write_tokenizer(folder)
    pool = (np.random.default_rng(0).standard_normal(1 << 24, dtype=np.float32) * 0.02)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(config).items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    index = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + math.prod(shape) * 2]}
            offset += math.prod(shape) * 2
            index[name] = file
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(folder / file, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for turn, (name, shape) in enumerate(shard):
                f.write(values(name, shape, pool, turn * 7919).tobytes())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))


def write_tokenizer(folder: Path) -> None:
    """A 262,144-piece BPE tokenizer.json: the test vocabulary's pieces and merges, then filler pieces."""
    from tokenizers import Tokenizer, models

    golden = json.loads((ROOT / "tests" / "data" / "gemma4_tokenizer_golden.json").read_text())
    pieces = golden["pieces"] + [f"filler{i}" for i in range(262144 - len(golden["pieces"]))]
    merges = [tuple(m.split(" ")) for m in golden["merges"]]
    Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, byte_fallback=True)).save(
        str(folder / "tokenizer.json"))


def measure(model: Path, quant: str, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(model), quant, str(threads)], capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/e2b-hf")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the folder and the GGUF")
    args = ap.parse_args()
    folder, gguf = Path(args.dir) / "hf", Path(args.dir) / "e2b-q4_1.gguf"
    if not folder.exists():
        t = time.perf_counter()
        write_folder(folder)
        print(f"wrote {folder} in {time.perf_counter() - t:.0f} s", flush=True)
    if not gguf.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gemmakit", "quantize", str(folder), "-o", str(gguf), "--type", "Q4_1",
                        "--threads", str(args.threads)], check=True, stderr=subprocess.DEVNULL)
        print(f"gemmakit quantize --type Q4_1: {gguf.stat().st_size / 2**30:.2f} GiB in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    runs: dict[str, list[dict]] = {"hf int4": [], "gguf Q4_1": []}
    for r in range(args.rounds):
        runs["hf int4"].append(measure(folder, "int4", args.threads))
        runs["gguf Q4_1"].append(measure(gguf, "auto", args.threads))
        print(f"round {r + 1}: " + "  ".join(f"{k} {({x: round(v, 2) for x, v in runs[k][-1].items() if x.endswith(('_s', 'mib'))})}"
                                             for k in runs), flush=True)
    same = all(a["first"] == b["first"] and a["tokens"] == b["tokens"] for a, b in zip(*runs.values()))
    print(f"folder size {sum(f.stat().st_size for f in folder.glob('*.safetensors')) / 2**30:.2f} GiB bf16; "
          f"same logits and tokens from both: {same}")
    print(f"{'figure':<14}{'hf int4':>10}{'gguf Q4_1':>11}{'ratio':>8}")
    for key in ("load_s", "rss_mib", "decode_tok_s"):
        a, b = (statistics.median(x[key] for x in runs[k]) for k in runs)
        print(f"{key:<14}{a:>10.2f}{b:>11.2f}{a / b:>8.2f}")
    if not args.keep:
        gguf.unlink()
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
