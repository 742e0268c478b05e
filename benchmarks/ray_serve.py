"""gemmakit on Ray Serve against one `gemmakit serve`, on this machine's cores.

    python benchmarks/ray_serve.py [--model PATH.gguf] [--rounds 3] [--levels 1,16,64] [--tokens 64]

Three servers, each started, measured and stopped in turn within every round (so a noisy moment hits all alike):
  single   `gemmakit serve --threads 2`
  ray 1x2  `gemmakit serve --ray --replicas 1 --replica-cpus 2` (one replica of two threads)
  ray 2x1  `gemmakit serve --ray --replicas 2 --replica-cpus 1` (two replicas of one thread)
each with --max-batch 32 per replica. At each client level, N streaming clients (benchmarks/serve_load.py) ask
--tokens tokens each (at 1 client: tok/s from three runs of 2x --tokens, their median; TTFT from 15 short
requests); per level: aggregate tok/s and TTFT p50/p99, medians over rounds. Level "1 long": one client whose
prompt has --long-prompt-words more words (~1.3 tokens each), new text each run so that no prefix cache helps.
Printed: the Ray path's overhead at one client (ray 1x2 / single: TTFT and tok/s) and 2x1 against 1x2 at every
level. That overhead is a rough figure here: it compares servers measured minutes apart, and a shared machine's
speed drifts by more than the targets over minutes (one process, requests one after another: 57 to 79 tok/s within
half an hour). Two starts of the *same* server one after the other gave, round by round, 0.74-1.13x in TTFT and
0.89-1.07x in tok/s (8 rounds). The paired mode below is what can tell a 5% overhead.

    python benchmarks/ray_serve.py --paired 60 [--direct]

The one-client overhead alone, paired: `single` and `ray 1x2` both up, one client alternating between them
(PAIRS pairs of 4-token requests for TTFT, PAIRS / 6 pairs of 2x --tokens tokens for tok/s); the medians of the
pairs' ratios. Each side then meets the same noise from the machine's neighbours, which in the default mode moves
whole rounds. While the single server answers, every process of the Ray server is paused (SIGSTOP), as if Ray
were not there: otherwise Ray's idle processes (6-9% of a core) and what a Ray request leaves to do after its end
would run during the single server's requests and flatter Ray (1.05x TTFT where this gave 1.13x). The Ray server
then runs RESUME_S alone before its own request (a client's pause between requests), so that what came due while
it was paused is not charged to that request either. `--control` adds a third server, a second `gemmakit serve`
paused and resumed as the Ray server is (each row asks the single server, then the other two in random order):
control / single is what the design gives for no overhead (its own bias and spread), ray / control the overhead
with that bias taken out.

The clients stand in for clients on other machines, whose CPU the servers' engines do not hold: their threads ask
for the scheduler's shortest slice (sched_slice.py; Linux 6.12+), so that a client that is sent a token runs at once
rather than after an engine thread's slice (on 2 cores, half of the first tokens were read ~3 ms late, on both
servers alike: noise, and a common delay that made the Ray path's ratio look smaller). The servers do not inherit it
(see start_server): their processes run as when started from a shell, with the default one. `--client-default-slice`
measures as before. `--direct` adds the Ray replica's own port to each TTFT pair (a triple, then): the replica under
Ray against the single server, and the ingress's relay against the replica. `--idle S`: the Ray server's CPU and
wake-ups with no request, per process, over S seconds (where the one-client overhead comes from when the engine holds
every core).
`--engine-threads 1`: engines of one thread on each side (on 2 cores, Ray's own processes then have a core that the
engine does not need, as on a node whose replicas leave a core free).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (benchmarks/ is not a package)
from sched_slice import prefer_short_slice  # noqa: E402

CONFIGS = {  # name: (threads per engine, extra serve flags)
    "single": (2, []),
    "ray 1x2": (2, ["--ray", "--replicas", "1", "--replica-cpus", "2"]),
    "ray 2x1": (1, ["--ray", "--replicas", "2", "--replica-cpus", "1"]),
}
FILLER = ("the keeper climbed the stairs at dusk and lit the lamp while the sea rose against the rocks below "
          "and the ships far out turned toward the light ").split()
RUN_IDS = itertools.count()
TTFT_SAMPLES = 15  # one-client requests whose first tokens give the TTFT figures
RESUME_S = 0.3  # --paired: how long the Ray server runs after its pause before its request (a client's pause)


def start_server(args: argparse.Namespace, extra: list[str]):
    """``gemmakit serve`` with ``extra`` flags (serve_load.start), its processes with the scheduler's default slice:
    a server's threads do not inherit the short slice this process's client threads ask for."""
    if args.client_default_slice:
        return serve_load.start("gemmakit", args, extra)
    prefer_short_slice(0)  # 0: the default slice, which the server's processes inherit from this thread
    try:
        return serve_load.start("gemmakit", args, extra)
    finally:
        prefer_short_slice()


def long_prompt(words: int) -> str:
    """A prompt of ``words`` words whose start differs each call (no prefix cache helps it)."""
    run = next(RUN_IDS)
    return f"Log {run}, entry {run * 7919 % 10007}: " + " ".join(itertools.islice(itertools.cycle(FILLER), words))


def one_client_runs(url: str, tokens: int, extra_body=None, ttft_samples: int = TTFT_SAMPLES) -> dict:
    """One client: tok/s, the median of three runs of ``tokens`` tokens; TTFT p50/p99 over ``ttft_samples``
    requests of 4 tokens, one after another (one first token per run would leave TTFT to chance on a noisy
    machine). ``extra_body``: a function giving fields for each request."""
    runs = [serve_load.run_round(url, 1, tokens, extra_body() if extra_body else None) for _ in range(3)]
    short = [serve_load.run_round(url, 1, 4, extra_body() if extra_body else None) for _ in range(ttft_samples)]
    ttfts = sorted(r["ttft_p50"] for r in short)
    return {"tok_s": statistics.median(r["tok_s"] for r in runs), "ttft_p50": statistics.median(ttfts),
            "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "errors": sum(r["errors"] for r in runs + short)}


def measure(name: str, args: argparse.Namespace) -> dict[int, dict]:
    """Start one server, warm it up, run every client level, stop it."""
    threads, extra = CONFIGS[name]
    args.threads = threads
    proc, url = start_server(args, extra)
    try:
        serve_load.run_round(url, 4, 8)  # warm-up: every replica's first steps
        rows = {}
        for clients in args.levels:
            if clients == 1:
                row = one_client_runs(url, 2 * args.tokens)
            elif clients == "1 long":  # serve_load's `sampling` fields go into the request body: a prompt too
                row = one_client_runs(url, 2 * args.tokens, lambda: {"prompt": long_prompt(args.long_prompt_words)})
            else:
                row = serve_load.run_round(url, clients, args.tokens)
            if row["errors"]:
                raise SystemExit(f"{name}, {clients} clients: {row['errors']} errors")
            rows[clients] = row
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc: each process's parent)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += parents.get(tree[-1], [])
    return tree


def signal_tree(pid: int, sig: int) -> None:
    for member in process_tree(pid):
        try:
            os.kill(member, sig)
        except ProcessLookupError:
            pass


def replica_url(ray_pid: int) -> str:
    """The HTTP port of the Ray server's (one) replica: a port its replica process listens on that answers
    /v1/models (from `ss -ltnp`; the replica's other ports are Ray's)."""
    import subprocess

    import httpx

    replicas = {pid for pid in process_tree(ray_pid) if b"ServeReplica" in Path(f"/proc/{pid}/cmdline").read_bytes()}
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines():
        if any(f"pid={pid}," in line for pid in replicas):
            url = "http://127.0.0.1:" + line.split()[3].rsplit(":", 1)[1]
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
    raise SystemExit("--direct: found no HTTP port of the Ray replica")


@dataclass
class Side:
    """One server of a paired run as the client asks it (the Ray server with --direct is two sides: its replica's
    port and its ingress, one process)."""

    name: str  # "single", "control" or "ray" (with --direct, its replica's port is a side of its own, "replica")
    proc: Any
    url: str


def start_sides(args: argparse.Namespace, sides: list[Side]) -> None:
    """Start the servers of a paired run into ``sides`` (so that the caller can stop those started if one fails),
    warmed up: the single server first (never paused), then those that are paused while another answers: with
    ``args.control`` a second single server, and the Ray server (with ``args.direct`` twice: its replica's own port,
    then its ingress)."""
    names = ["single"] + (["control"] if args.control else []) + ["ray"]
    for name in names:
        args.threads, extra = CONFIGS["ray 1x2" if name == "ray" else "single"]
        if args.engine_threads:  # one engine of that many threads on each side
            args.threads = args.engine_threads
            extra = [str(args.engine_threads) if flag == "2" else flag for flag in extra]
        proc, url = start_server(args, extra)
        if name == "ray" and args.direct:
            sides.append(Side("replica", proc, replica_url(proc.pid)))
        sides.append(Side(name, proc, url))
    for side in sides:
        serve_load.run_round(side.url, 4, 8)


def ask_alone(sides: list[Side], side: Side, tokens: int, key: str) -> float:
    """One request of ``tokens`` tokens to ``side``, every other pausable server paused meanwhile (SIGSTOP), as if
    it were not there. A pausable side then runs RESUME_S before its request: the timers that came due during its
    pause fire then, not in its request. So each side pays for all its own work: its idle processes, and what a
    request leaves for later."""
    for other in sides[1:]:
        if other.proc is not side.proc:
            signal_tree(other.proc.pid, signal.SIGSTOP)
    if side is not sides[0]:
        signal_tree(side.proc.pid, signal.SIGCONT)
        time.sleep(RESUME_S)
    return serve_load.run_round(side.url, 1, tokens)[key]


def paired(args: argparse.Namespace, pairs: int) -> None:
    """The one-client overhead of the Ray path, measured request by request (see the module's docstring): each
    row asks the single server, then the other servers in random order (``--direct``: the replica's port just
    before the ingress), so that with ``--control`` neither of those two always comes last."""
    order = random.Random(1)
    sides: list[Side] = []
    try:
        start_sides(args, sides)
        by_server = [[s for s in sides[1:] if s.proc is proc] for proc in dict.fromkeys(s.proc for s in sides[1:])]

        def row(tokens: int, key: str, names: set[str]) -> dict[str, float]:
            servers = order.sample(by_server, len(by_server))  # a server's sides stay together, in their order
            asked = [sides[0]] + [s for server in servers for s in server if s.name in names]
            return {s.name: ask_alone(sides, s, tokens, key) for s in asked}

        ttft = [row(4, "ttft_p50", {s.name for s in sides}) for _ in range(pairs)]
        tok_s = [row(2 * args.tokens, "tok_s", {"control", "ray"}) for _ in range(max(3, pairs // 6))]
        if args.dump:
            Path(args.dump).write_text(json.dumps({"ttft": ttft, "tok_s": tok_s}))
    finally:
        for side in sides:
            signal_tree(side.proc.pid, signal.SIGCONT)
        for proc in dict.fromkeys(side.proc for side in sides):
            proc.terminate()
            proc.wait(timeout=120)
    report_paired(args, ttft, tok_s)


def report_paired(args: argparse.Namespace, ttft: list[dict[str, float]], tok_s: list[dict[str, float]]) -> None:
    print(f"engines of {args.threads} threads: `gemmakit serve` against one Ray replica"
          + (" and a second `gemmakit serve` paused and resumed as Ray is (control)" if args.control else ""))
    print_pairs("TTFT ms", ttft, "single", "ray", "<= 1.10x", 1000)
    print_pairs("tok/s", tok_s, "single", "ray", ">= 0.95x", 1)
    if args.control:  # what the design gives for no overhead, and the Ray side against that
        for label, rows, scale in (("TTFT ms", ttft, 1000), ("tok/s", tok_s, 1)):
            print_pairs(label, rows, "single", "control", "1.00x", scale)
            print_pairs(label, rows, "control", "ray", "as ray / single", scale)
    if args.direct:
        print_pairs("TTFT ms", ttft, "single", "replica", "", 1000)
        print_pairs("TTFT ms", ttft, "replica", "ray", "", 1000)


def median_interval(values: list[float], resamples: int = 2000) -> tuple[float, float]:
    """A 90% bootstrap interval of the median of ``values``: how far another run's median may land."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[resamples // 20], medians[-resamples // 20]


def process_cpu(pids: list[int]) -> dict[int, tuple[str, int, int]]:
    """CPU so far of each of ``pids``: pid -> (name, nanoseconds on a CPU, wake-ups). Both are the sums over its
    live threads' schedstat and context switches: exact where /proc/PID/stat's ticks are sampled (Ray's threads
    wake hundreds of times a second for tens of microseconds, which 10 ms ticks catch or miss at random)."""
    usage = {}
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            # A Python process by its script (or module): the ingress is `-m gemmakit.cli`
            name = next((a for a in argv[1:] if a.endswith(".py")), argv[argv.index("-m") + 1] if "-m" in argv
                        else argv[0]) if argv[0].endswith(("python", "python3")) else argv[0]
            ns = wakeups = 0
            for tid in os.listdir(f"/proc/{pid}/task"):
                ns += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
                wakeups += int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])  # not nonvoluntary_
            usage[pid] = (Path(name).name[:40], ns, wakeups)
        except (OSError, IndexError, ValueError):  # gone meanwhile (the process, or one of its threads)
            continue
    return usage


def idle(args: argparse.Namespace, seconds: float) -> None:
    """What the Ray server (one replica of 2 threads) does with no request: each of its processes' CPU, in % of a
    core, and wake-ups a second, over ``seconds`` (after a warm-up and 15 s of quiet)."""
    args.threads, extra = CONFIGS["ray 1x2"]
    proc, url = start_server(args, extra)
    try:
        serve_load.run_round(url, 2, 8)
        time.sleep(15)
        before = process_cpu(process_tree(proc.pid))
        time.sleep(seconds)
        after = process_cpu(process_tree(proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    used = {f"{name} (pid {pid})": ((ns - before[pid][1]) / seconds / 1e7, (wakeups - before[pid][2]) / seconds)
            for pid, (name, ns, wakeups) in after.items() if pid in before}
    print(f"idle for {seconds:.0f} s: {sum(u[0] for u in used.values()):.2f}% of a core in all, "
          f"{sum(u[1] for u in used.values()):.0f} wake-ups a second")
    for label, (share, wakeups) in sorted(used.items(), key=lambda item: -item[1][0]):
        if share >= 0.05:
            print(f"  {share:5.2f}%  {wakeups:6.1f}/s  {label}")


def print_pairs(label: str, rows: list[dict[str, float]], base: str, other: str, target: str, scale: float) -> None:
    """The median over ``rows`` of other / base, with its 90% interval and quartiles."""
    ratios = sorted(r[other] / r[base] for r in rows)
    low, high = median_interval(ratios)
    print(f"{label}: {base} {scale * statistics.median(r[base] for r in rows):.1f}, {other} "
          f"{scale * statistics.median(r[other] for r in rows):.1f}; {other} / {base}, median of {len(rows)}: "
          f"{statistics.median(ratios):.3f}x ({f'target {target}; ' if target else ''}90% interval "
          f"{low:.3f}-{high:.3f}; quartiles {ratios[len(ratios) // 4]:.3f}-{ratios[3 * len(ratios) // 4]:.3f})")


def report(results: dict[str, list[dict[int, dict]]], levels: list[int]) -> None:
    def med(name: str, clients: int, key: str) -> float:
        return statistics.median(r[clients][key] for r in results[name])

    def pairs(a: str, b: str, clients: int, key: str) -> str:
        ratios = [x[clients][key] / y[clients][key] for x, y in zip(results[a], results[b])]
        return f"{statistics.median(ratios):.3f}x (rounds: {', '.join(f'{r:.3f}' for r in ratios)})"

    print("\nmedians over rounds:")
    print(f"{'server':<9} {'clients':>7} {'tok/s':>8} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12}")
    for name in results:
        for clients in levels:
            print(f"{name:<9} {clients!s:>7} {med(name, clients, 'tok_s'):>8.1f} "
                  f"{1000 * med(name, clients, 'ttft_p50'):>12.1f} {1000 * med(name, clients, 'ttft_p99'):>12.1f}")
    for level in (1, "1 long"):
        if level in levels and "single" in results and "ray 1x2" in results:
            print(f"\nRay path at {level} client (ray 1x2 / single): "
                  f"TTFT {pairs('ray 1x2', 'single', level, 'ttft_p50')} (target <= 1.10x), "
                  f"tok/s {pairs('ray 1x2', 'single', level, 'tok_s')} (target >= 0.95x)")
    if "ray 1x2" in results and "ray 2x1" in results:
        for clients in levels:
            print(f"2x1 / 1x2 at {clients!s} clients: tok/s {pairs('ray 2x1', 'ray 1x2', clients, 'tok_s')}, "
                  f"TTFT p50 {pairs('ray 2x1', 'ray 1x2', clients, 'ttft_p50')}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF path (default: the bundled Gemma 3 270M)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--levels", default="1,1 long,16,64", help="client counts, comma-separated ('1 long': one "
                    "client with a long prompt)")
    ap.add_argument("--long-prompt-words", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per client (at 1 client: twice this)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="which servers, comma-separated")
    ap.add_argument("--paired", type=int, metavar="PAIRS", help="only the one-client overhead, in PAIRS "
                    "alternating requests (see above)")
    ap.add_argument("--direct", action="store_true", help="with --paired: also the Ray replica's own port (the "
                    "replica under Ray against the ingress's relay; Linux, needs `ss`)")
    ap.add_argument("--control", action="store_true", help="with --paired: also a second `gemmakit serve`, paused "
                    "and resumed as the Ray server is: what the design itself gives for no overhead")
    ap.add_argument("--engine-threads", type=int, metavar="T", help="with --paired: engines of T threads (one "
                    "server with T, one replica of T) rather than 2; with 1 on 2 cores, the rest of each server has a "
                    "core of its own")
    ap.add_argument("--idle", type=float, metavar="S", help="only the Ray server's CPU while idle, per process, "
                    "over S seconds (Linux)")
    ap.add_argument("--dump", metavar="FILE", help="with --paired: write every pair's figures to FILE (JSON)")
    ap.add_argument("--client-default-slice", action="store_true", help="leave the clients' threads the "
                    "scheduler's default slice (they then wait for the servers' engine threads)")
    args = ap.parse_args()
    if args.control and not args.paired:
        ap.error("--control goes with --paired")
    if args.model is None:
        import gemmakit

        args.model = str(gemmakit.default_model_path())
    args.levels = [x if x == "1 long" else int(x) for x in args.levels.split(",")]
    args.max_batch, args.kv_cache_mib = 32, 1024
    if not args.client_default_slice:
        prefer_short_slice()  # this process's client threads (made later) inherit it; its servers do not
    if args.idle:
        idle(args, args.idle)
        return 0
    if args.paired:
        paired(args, args.paired)
        return 0
    names = args.configs.split(",")
    results: dict[str, list[dict[int, dict]]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            rows = measure(name, args)
            results[name].append(rows)
            print(f"round {r + 1} {name}: " + ", ".join(
                f"{c!s} clients {row['tok_s']:.1f} tok/s TTFT p50 {1000 * row['ttft_p50']:.0f} ms"
                for c, row in rows.items()), flush=True)
    report(results, args.levels)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
