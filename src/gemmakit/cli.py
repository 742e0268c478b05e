"""The ``gemmakit`` command: run, chat, serve, bench, models, show.

Every flag is checked before the model loads (a load takes seconds), so a typo costs nothing. Answers go to
stdout; the spinner, statistics, logprobs and errors go to stderr, so ``gemmakit run ... > out.txt`` keeps only
the text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from typing import Any, Iterator

from . import __version__
from .errors import GemmakitError, InvalidParameterError
from .sampling import SamplingParams

# `gemmakit quantize --type` (convert.writer.GGUF_TYPES, listed here so --help needs no torch import)
GGUF_TYPE_CHOICES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M",
                     "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K")
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed", "stop", "ignore_eos", "logprobs")


def _verbose_parent() -> argparse.ArgumentParser:
    """-v/--verbose, accepted before or after the subcommand (SUPPRESS: a subcommand's absent flag does not
    reset one given before it)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="log progress to stderr")
    return parent


def _add_model_args(p: argparse.ArgumentParser, context_default: str = "the model's maximum") -> None:
    p.add_argument("--model", "-m", help="a GGUF file, a Hugging Face model folder, or the name of one in the "
                                         "models folder (see `gemmakit models`); default: the bundled Gemma 3 270M")
    p.add_argument("--threads", "-t", type=int, help=f"CPU threads, 1-{os.cpu_count()} (default: all cores)")
    p.add_argument("--context-length", "-c", type=int, help=f"most tokens per sequence (default: {context_default})")
    p.add_argument("--quant", default="auto", choices=["auto", "int8", "int4", "fp32", "bf16"],
                   help="GGUF weights in memory: auto/int8 keep them quantized (default), fp32/bf16 dequantize; "
                        "a Hugging Face folder: int8/int4 quantize its matrices while loading")
    p.add_argument("--decode-x-bits", type=int, default=16, choices=[16, 8],
                   help="bits activations are rounded to in quantized decode products: 16 (default) or 8, "
                        "llama.cpp's precision, faster for many concurrent sequences on CPUs with AVX-512 VNNI")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = SamplingParams  # the defaults shown are SamplingParams' own: one table for CLI, API and server
    g = p.add_argument_group("sampling (defaults: the model's recommended settings, else gemmakit's shown here)")
    g.add_argument("--max-tokens", "-n", type=int, help=f"most new tokens (default {d.max_tokens})")
    g.add_argument("--temperature", "--temp", type=float, help=f"0 for greedy (default {d.temperature})")
    g.add_argument("--top-k", type=int, help=f"0 disables (default {d.top_k})")
    g.add_argument("--top-p", type=float, help=f"1 disables (default {d.top_p})")
    g.add_argument("--min-p", type=float, help=f"0 disables (default {d.min_p})")
    g.add_argument("--repetition-penalty", type=float, help=f"1 disables (default {d.repetition_penalty})")
    g.add_argument("--presence-penalty", type=float, help=f"default {d.presence_penalty}")
    g.add_argument("--frequency-penalty", type=float, help=f"default {d.frequency_penalty}")
    g.add_argument("--seed", "-s", type=int, help="seed of the random draws (default: a fresh one each run)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", default=None, help="keep going past end of text")
    g.add_argument("--logprobs", type=int, help="show each token's logprob and this many alternatives (0-20)")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags the user gave (the rest stay the model's defaults), checked now: before loading."""
    given = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name, None) is not None}
    for name, value in given.items():
        try:
            SamplingParams.from_kwargs(**{name: value})
        except InvalidParameterError as exc:
            raise InvalidParameterError(f"--{name.replace('_', '-')}: {exc}") from None
    return given


def _check_model_args(args: argparse.Namespace) -> None:
    """Flag values that can be checked without the model."""
    cpus = os.cpu_count() or 1
    if args.threads is not None and not 1 <= args.threads <= cpus:
        raise InvalidParameterError(f"--threads {args.threads}: must be in [1, {cpus}] (this machine has {cpus} "
                                    "CPUs; more threads than CPUs only slows every one of them down)")
    if args.context_length is not None and args.context_length < 1:
        raise InvalidParameterError(f"--context-length {args.context_length}: must be a positive number of tokens")


@contextmanager
def _spinner(message: str, delay: float = 0.3) -> Iterator[None]:
    """Show a spinner on stderr (a terminal only) if the block takes longer than ``delay`` seconds; its line is
    cleared before the block's result is printed."""
    done = threading.Event()

    def spin() -> None:
        if done.wait(delay):
            return
        frames = "|/-\\"
        i = 0
        while not done.wait(0.1):
            sys.stderr.write(f"\r{message} {frames[i % 4]}")
            sys.stderr.flush()
            i += 1
        sys.stderr.write("\r" + " " * (len(message) + 2) + "\r")
        sys.stderr.flush()

    thread = threading.Thread(target=spin, daemon=True) if sys.stderr.isatty() else None
    if thread:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread:
            thread.join()


def _load(args: argparse.Namespace):
    from . import load
    from .catalog import resolve_model

    # With -v the log says what loading does; a spinner would scribble over its lines.
    quiet = getattr(args, "verbose", False)
    with _spinner("Loading model") if not quiet else nullcontext():
        return load(resolve_model(args.model), context_length=args.context_length, threads=args.threads,
                    quant=args.quant, decode_x_bits=args.decode_x_bits)


def _completion_json(c) -> dict[str, Any]:
    out = {
        "text": c.text,
        "token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "usage": {**asdict(c.usage), "total_tokens": c.usage.total_tokens},
        "timings": c.timings,
    }
    if c.logprobs is not None:
        out["logprobs"] = [asdict(lp) for lp in c.logprobs]
    return out


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt argument, or standard input when it is ``-`` or left out (and input is not a terminal)."""
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    if args.prompt is None and sys.stdin.isatty():
        raise InvalidParameterError("give a prompt: gemmakit run \"...\", or pipe one in (echo ... | gemmakit run -)")
    text = sys.stdin.read()
    if not text.strip():
        raise InvalidParameterError("the prompt read from standard input is empty")
    return text.rstrip("\n")


class RunStats:
    """Counts for the statistics line after an answer (llama.cpp prints one too)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.tokens = 0
        self.finish: str | None = None
        self.logprobs: list[Any] = []

    def add(self, event) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.tokens += not event.stop_token
        self.finish = event.finish_reason or self.finish
        if event.logprob is not None and not event.stop_token:
            self.logprobs.append(event.logprob)

    def line(self, prompt_tokens: int) -> str:
        end = time.perf_counter()
        first = (self.first or end) - self.start
        # tokens after the first, over the time after it: the decode rate, as llama.cpp reports it
        decoding = end - self.first if self.first is not None else 0.0
        rate = (self.tokens - 1) / decoding if self.tokens > 1 and decoding > 0 else 0.0
        return (f"[{prompt_tokens} prompt tokens, {self.tokens} generated, {rate:.1f} tok/s, "
                f"first token after {first:.2f} s, {end - self.start:.2f} s in all]")


def _limit_marker(stats: RunStats, max_tokens: int | None) -> str | None:
    """The line that says the token limit cut the answer, or None when it ended by itself."""
    if stats.finish != "length":
        return None
    limit = f"the {max_tokens}-token limit" if max_tokens is not None else "the context length"
    return f"[answer cut at {limit}: raise --max-tokens/-n for more]"


def _logprob_table(tokenizer, logprobs: list[Any]) -> str:
    """Each generated token with its log-probability and the alternatives, one line each."""
    lines = [f"{'token':<20} {'logprob':>9}  alternatives"]
    for lp in logprobs:
        token = json.dumps(tokenizer.decode([lp.token_id]), ensure_ascii=False)
        top = ", ".join(f"{json.dumps(tokenizer.decode([i]), ensure_ascii=False)} {v:.3f}" for i, v in lp.top)
        lines.append(f"{token:<20} {lp.logprob:>9.4f}  {top}")
    return "\n".join(lines)


def _report(llm, stats: RunStats, prompt_tokens: int, params: SamplingParams) -> None:
    """What follows an answer on stderr: logprobs when asked, the limit marker, the statistics line."""
    if stats.logprobs:
        print(_logprob_table(llm.tokenizer, stats.logprobs), file=sys.stderr)
    marker = _limit_marker(stats, params.max_tokens)
    if marker:
        print(marker, file=sys.stderr)
    print(stats.line(prompt_tokens), file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    sampling = _sampling(args)
    _check_model_args(args)
    llm = _load(args)
    params = llm.sampling_params(**sampling)
    if args.json:
        print(json.dumps(_completion_json(llm.generate(prompt, params)), ensure_ascii=False))
        return 0
    ids = llm.prompt_ids(prompt)
    events = llm.stream(ids, params)  # raises (too long, ...) before anything is printed
    stats = RunStats()
    sys.stdout.write(prompt)
    try:
        for ev in events:
            stats.add(ev)
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()
    _report(llm, stats, len(ids), params)
    return 0


CHAT_HELP = """commands:
  /help              this list
  /system [TEXT]     set the system prompt (no TEXT: show it); clears the conversation
  /clear, /reset     forget the conversation
  /bye, /quit, /exit leave (Ctrl-D too)
Up/Down recall earlier lines; Ctrl-C stops an answer."""


class ChatSession:
    """The state of ``gemmakit chat``: the system prompt and the conversation so far."""

    def __init__(self, llm, params: SamplingParams, system: str | None) -> None:
        self.llm, self.params, self.system = llm, params, system
        self.history: list[dict[str, str]] = []

    def command(self, line: str) -> bool:
        """Handle a /command; False when it asks to leave."""
        name, _, rest = line.partition(" ")
        if name in ("/bye", "/quit", "/exit"):
            return False
        if name == "/help":
            print(CHAT_HELP, file=sys.stderr)
        elif name in ("/clear", "/reset"):
            self.history.clear()
            print("(conversation cleared)", file=sys.stderr)
        elif name == "/system":
            if rest.strip():
                self.system = rest.strip()
                self.history.clear()
                print("(system prompt set; conversation cleared)", file=sys.stderr)
            else:
                print(f"(system prompt: {self.system!r})", file=sys.stderr)
        else:
            print(f"unknown command {name}: /help lists them", file=sys.stderr)
        return True

    def answer(self, text: str) -> None:
        """Send a user message and stream the reply to stdout."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": text})
        reply: list[str] = []
        stats = RunStats()
        try:
            events = self.llm.chat_stream(messages, self.params)
            for ev in events:
                stats.add(ev)
                if ev.reasoning:  # Gemma 4's thought channel: beside the answer, never in it
                    sys.stderr.write(ev.reasoning)
                sys.stdout.write(ev.content or "")
                sys.stdout.flush()
                reply.append(ev.content or "")
        except GemmakitError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
        sys.stdout.write("\n")
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(reply)}]
        marker = _limit_marker(stats, self.params.max_tokens)
        if marker:
            print(marker, file=sys.stderr)


def _enable_line_editing() -> None:
    """Line editing and Up/Down history for input() (GNU readline where Python has it), kept across sessions
    in the gemmakit cache folder."""
    try:
        import atexit
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input
        return
    from .catalog import cache_dir

    history = cache_dir() / "chat_history"
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history)
        except OSError:
            pass

    atexit.register(save)


def cmd_chat(args: argparse.Namespace) -> int:
    sampling = _sampling(args)
    _check_model_args(args)
    llm = _load(args)
    session = ChatSession(llm, llm.sampling_params(**sampling), args.system)
    if sys.stdin.isatty():
        _enable_line_editing()
    print("Chat with the model. /help lists the commands, /bye leaves.", file=sys.stderr)
    if llm.path.name.startswith("gemma-3-270m"):
        print("Note: the bundled Gemma 3 270M is a small base model (not chat-tuned): expect rough chat answers.",
              file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if text.startswith("/"):
            if not session.command(text):
                return 0
        elif text:
            session.answer(text)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench
    from .catalog import resolve_model

    _check_model_args(args)
    result = run_bench(resolve_model(args.model), prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                       threads=args.threads, random_weights=args.random_weights, quant=args.quant,
                       decode_x_bits=args.decode_x_bits)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")
    return 0


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def cmd_models(args: argparse.Namespace) -> int:
    from .catalog import list_models, models_dir

    entries = list_models()
    if args.json:
        print(json.dumps([{**asdict(e), "path": str(e.path)} for e in entries]))
        return 0
    print(f"{'NAME':<28} {'SIZE':>9}  PATH")
    for e in entries:
        where = f"{len(e.extra['parts'])} parts read in place, from {e.extra['parts'][0]} on" if "parts" in e.extra \
            else str(e.path)
        print(f"{e.name:<28} {_human_size(e.size):>9}  {where}")
    print(f"\nmodels folder: {models_dir()} (put GGUF files or Hugging Face folders there to use them by name)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .catalog import describe_model, resolve_model

    info = describe_model(resolve_model(args.model_arg or args.model))
    if args.json:
        print(json.dumps(info))
        return 0
    template = info.pop("chat_template")
    for key, value in info.items():
        if key == "parameters" and value:
            value = f"{value / 1e6:.1f} M"
        elif key == "size":
            value = _human_size(value)
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"{key:>18}: {value}")
    if args.template:
        print(template or "(no chat template in the file: the family's built-in format is used)")
    else:
        first = (template or "").strip().splitlines()
        print(f"{'chat_template':>18}: " + (f"{len(template)} characters, starts {first[0][:60]!r} "
                                            "(--template prints it)" if first else "none (the family's built-in)"))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .convert import quantize_folder

    cpus = os.cpu_count() or 1
    if args.threads is not None:
        if not 1 <= args.threads <= cpus:
            raise InvalidParameterError(f"--threads {args.threads}: must be in [1, {cpus}]")
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def progress(name: str, done: int, total: int) -> None:
        print(f"\r[{done}/{total}] {name:<48}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    out = quantize_folder(Path(args.folder), Path(args.output), args.type, progress=progress, threads=args.threads)
    print(f"wrote {out} ({_human_size(out.stat().st_size)}, {args.type}) in {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    return 0


def _check_port_free(host: str, port: int) -> None:
    """Fail now, not after loading the model, when the address cannot be listened on."""
    import socket

    if not 0 < port < 65536:
        raise InvalidParameterError(f"--port {port}: must be in [1, 65535]")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidParameterError(f"--host {host}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise InvalidParameterError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _read_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key or [])
    if args.api_keys_file:
        try:
            with open(args.api_keys_file) as f:
                keys += [line.strip() for line in f if line.strip()]
        except OSError as exc:
            raise InvalidParameterError(f"--api-keys-file {args.api_keys_file}: {exc.strerror}") from None
    return keys


def _app_options(args: argparse.Namespace, keys: list[str], policy) -> dict[str, Any]:
    """create_app's arguments from the serve flags (the same for one server and for each Ray replica)."""
    return dict(model_name=args.model_name, api_keys=keys, max_batch=args.max_batch, max_waiting=args.max_waiting,
                context_length=args.context_length, kv_cache_bytes=args.kv_cache_mib * 2**20,
                log_prompts=args.log_prompts, strict_model_name=args.strict_model_name,
                public_docs_and_metrics=args.public_docs_and_metrics, limits=_limits(args), safety=policy,
                prefix_cache=not args.no_prefix_cache, safety_window=args.safety_window)


def _print_serving(model_id: str, args: argparse.Namespace, extra: str = "") -> None:
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Serving {model_id} at http://{host}:{args.port}/v1 (chat page: http://{host}:{args.port}/){extra}",
          file=sys.stderr, flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    try:
        import uvicorn

        from .server import create_app
        from .server.lifecycle import GracefulServer
    except ImportError as exc:
        raise InvalidParameterError(f"the server needs its extra packages ({exc.name} is missing): "
                                    "pip install 'gemmakit[server]'") from None
    keys = _read_keys(args)
    _check_model_args(args)
    _check_port_free(args.host, args.port)
    from .safety import SafetyPolicy
    from .safety.audit import AuditLog

    # A bad policy file or audit path fails before the model loads.
    policy = SafetyPolicy.from_file(args.safety) if args.safety else None
    if args.ray:
        return _serve_on_ray(args, keys, policy)
    ray_only = [flag for flag, value in (("--ray-address", args.ray_address), ("--replicas", args.replicas != 1),
                                         ("--min-replicas", args.min_replicas), ("--max-replicas", args.max_replicas),
                                         ("--downscale-delay", args.downscale_delay is not None),
                                         ("--replica-cpus", args.replica_cpus)) if value]
    if ray_only:
        raise InvalidParameterError(f"{', '.join(ray_only)}: only with --ray (replicas on Ray Serve)")
    audit = AuditLog(args.audit_db, args.audit_text, args.audit_retention_days) if args.audit_db else None
    llm = _load(args)
    # Logging starts after the load: its lines never land on the spinner's line.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(llm, audit=audit, data_dir=args.data_dir, **_app_options(args, keys, policy))
    _print_serving(app.state.model_id, args)
    # The engine thread and the event loop share the GIL. When a kernel call returns, the engine waits for the
    # loop to let go of it, by default up to 5 ms (the switch interval) while the loop writes a step's chunks;
    # 1 ms keeps that wait short next to a ~15-60 ms step.
    sys.setswitchinterval(0.001)
    server = GracefulServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"),
                            app.state.gemmakit, args.shutdown_timeout)
    server.run()
    return 1 if server.forced else 0


def _ray_options(args: argparse.Namespace):
    from .cluster.launch import RayOptions

    cpus = args.replica_cpus or float(args.threads or max(1, (os.cpu_count() or 1) // args.replicas))
    options = RayOptions(address=args.ray_address, replicas=args.replicas, min_replicas=args.min_replicas,
                         max_replicas=args.max_replicas, replica_cpus=cpus, shutdown_timeout=args.shutdown_timeout,
                         downscale_delay=args.downscale_delay)
    options.check()
    return options


def _serve_on_ray(args: argparse.Namespace, keys: list[str], policy) -> int:
    """gemmakit serve --ray: replicas on Ray Serve, this process their ingress."""
    import logging

    from .batch.store import BatchStore
    from .safety.audit import AuditLog

    try:
        from .cluster.audit import start_audit_writer, stop_audit_writer
        from .cluster.ingress import IngressOptions
        from .cluster.launch import serve_ingress, start, start_ray, stop_after_failed_start
        from .cluster.replica import ReplicaSpec
    except ImportError as exc:
        raise InvalidParameterError(f"--ray needs Ray Serve ({exc.name} is missing): "
                                    "pip install 'gemmakit[ray]'") from None
    options = _ray_options(args)
    if args.audit_db:  # a bad path fails here, before Ray starts (the writer actor opens it again)
        AuditLog(args.audit_db, args.audit_text, args.audit_retention_days).close()
    if args.data_dir:  # likewise (the ingress opens it again)
        BatchStore(args.data_dir).close()
    app_options = _app_options(args, keys, policy)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started_ray = start_ray(args.ray_address)
    writer = None
    try:
        if args.audit_db:  # one file for every replica, written by an actor on this machine
            writer, app_options["audit"] = start_audit_writer(args.audit_db, args.audit_text,
                                                              args.audit_retention_days)
        spec = ReplicaSpec(model=args.model, threads=args.threads or max(1, int(options.replica_cpus)),
                           load_options=dict(context_length=args.context_length, quant=args.quant,
                                             decode_x_bits=args.decode_x_bits),
                           app_options=app_options, listen_host=None if args.ray_address else "127.0.0.1")
        with _spinner("Starting replicas"):
            handle = start(spec, options, args.max_batch, args.max_waiting)
    except BaseException:
        stop_after_failed_start(started_ray)
        raise
    count = f"{options.min_replicas}-{options.max_replicas}" if options.min_replicas else str(options.replicas)
    ingress = IngressOptions(api_keys=tuple(keys), limits=_limits(args),
                             public_docs_and_metrics=args.public_docs_and_metrics,
                             replicas=options.min_replicas or options.replicas, data_dir=args.data_dir,
                             rows_per_replica=args.max_batch)
    serve_ingress(handle, args.host, args.port, ingress, args.shutdown_timeout, started_ray,
                  on_ready=lambda model_id: _print_serving(model_id, args, f" on {count} Ray Serve replicas"),
                  after_stop=(lambda: stop_audit_writer(writer)) if writer is not None else None)
    return 0


LIMIT_HELP = {
    "max_body_bytes": "request body bytes; more is a 413",
    "max_header_bytes": "request header bytes; more is a 431",
    "max_messages": "chat messages in one request",
    "max_stop": "stop strings in one request",
    "max_stop_chars": "characters of one stop string",
    "max_n": "choices (n) of one request",
    "max_logit_bias": "logit_bias entries of one request",
    "max_tools": "tools of one request",
    "max_file_bytes": "bytes of one upload to /v1/files (batch input); more is a 413",
}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive integer")
    return value


def _add_limit_args(serve: argparse.ArgumentParser) -> None:
    """One flag per ServerLimits field, its default the dataclass's."""
    from dataclasses import fields

    from .server.limits import ServerLimits

    g = serve.add_argument_group("request limits (past one: HTTP 413/431/400 naming it)")
    for f in fields(ServerLimits):
        g.add_argument("--" + f.name.replace("_", "-"), type=_positive, default=f.default,
                       help=f"{LIMIT_HELP[f.name]} (default {f.default})")


def _limits(args: argparse.Namespace):
    from dataclasses import fields

    from .server.limits import ServerLimits

    return ServerLimits(**{f.name: getattr(args, f.name) for f in fields(ServerLimits)})


def _add_serve_parser(sub, parent: argparse.ArgumentParser) -> None:
    serve = sub.add_parser("serve", parents=[parent], help="OpenAI-compatible HTTP server and chat page")
    _add_model_args(serve, context_default="8192, or the model's maximum if smaller")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", "-p", type=int, default=8000)
    serve.add_argument("--api-key", action="append", help="require this bearer key (repeatable)")
    serve.add_argument("--api-keys-file", help="file with one accepted key per line")
    serve.add_argument("--model-name", help="model id the server reports (default: the file name)")
    serve.add_argument("--strict-model-name", action="store_true",
                       help="answer only requests naming --model-name (default: any name, as Ollama and "
                            "llama-server do with one model)")
    serve.add_argument("--public-docs-and-metrics", action="store_true",
                       help="with API keys, leave /metrics and the API docs open (default: they need a key; "
                            "/health and the chat page are always open)")
    serve.add_argument("--max-batch", type=int, default=8,
                       help="sequences generating at once, 1-64 (default 8); each holds a KV cache row")
    serve.add_argument("--max-waiting", type=int, default=64,
                       help="requests that may wait for a row (default 64); more get HTTP 429")
    serve.add_argument("--kv-cache-mib", type=int, default=1024,
                       help="KV cache memory (default 1024 MiB); bounds max-batch rows of context-length tokens")
    serve.add_argument("--log-prompts", action="store_true", help="include prompt text in the request log")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="on SIGTERM/Ctrl-C, seconds the running requests may take to finish before they are "
                            "ended (default 30); a second signal exits at once")
    serve.add_argument("--safety", metavar="FILE",
                       help="safety policy (TOML or YAML): guards on input and output, thresholds, block/redact/flag "
                            "(see gemmakit.safety.policy); without it only /v1/moderations runs the built-in guards")
    serve.add_argument("--safety-window", type=int, default=64, metavar="CHARS",
                       help="characters of a streamed answer the output guards check at a time (default 64)")
    serve.add_argument("--audit-db", metavar="FILE",
                       help="keep an audit log in this SQLite file: a row per request (key hash, tokens, safety "
                            "decisions, latency) and the reports of POST /v1/feedback")
    serve.add_argument("--audit-text", action="store_true",
                       help="also keep prompt and answer text in the audit log (default: ids, counts, decisions)")
    serve.add_argument("--audit-retention-days", type=float, metavar="DAYS",
                       help="delete audit rows older than this (default: keep them)")
    serve.add_argument("--no-prefix-cache", action="store_true",
                       help="read every prompt whole (default: a prompt that starts with tokens a free KV cache row "
                            "still holds, such as a conversation's earlier turns, reads only the rest)")
    serve.add_argument("--data-dir", metavar="DIR",
                       help="keep uploaded files and batch jobs here (SQLite + files): enables /v1/files and "
                            "/v1/batches; a restarted server resumes its batches")
    _add_ray_args(serve)
    _add_limit_args(serve)
    serve.set_defaults(func=cmd_serve)


def _add_ray_args(serve: argparse.ArgumentParser) -> None:
    g = serve.add_argument_group("Ray Serve (several replicas, one or more machines; pip install 'gemmakit[ray]')")
    g.add_argument("--ray", action="store_true",
                   help="serve through replicas on Ray Serve, this process their ingress (same API, keys, limits)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="an existing Ray cluster (what `ray start --head` printed); default: a local Ray instance")
    g.add_argument("--replicas", type=_positive, default=1, help="replicas, each one engine (default 1)")
    g.add_argument("--min-replicas", type=_positive, metavar="A",
                   help="autoscale between A and --max-replicas on requests in flight per replica")
    g.add_argument("--max-replicas", type=_positive, metavar="B")
    g.add_argument("--downscale-delay", type=float, metavar="S",
                   help="seconds of low load before the autoscaler removes a replica (default 120)")
    g.add_argument("--replica-cpus", type=float, metavar="C",
                   help="CPUs Ray reserves for each replica, and its threads (default: --threads, or the cores "
                        "shared by the replicas)")


def cmd_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .batch import read_input, run_batch

    source, output = Path(args.input), Path(args.output)
    errors = Path(args.errors) if args.errors else output.with_name(output.stem + ".errors.jsonl")
    read_input(source)  # a missing file or repeated custom_ids fail before the model loads
    summary = run_batch(_load(args), source, output, errors, max_batch=args.max_batch,
                        context_length=args.context_length, kv_cache_bytes=args.kv_cache_mib * 2**20,
                        show_progress=not args.quiet, app_options={"prefix_cache": not args.no_prefix_cache})
    print(f"{summary.total} requests: {summary.skipped} done before, {summary.succeeded} answered now, "
          f"{summary.failed} failed (see {errors})", file=sys.stderr)
    return 0


def _add_batch_parser(sub, parent: argparse.ArgumentParser) -> None:
    batch = sub.add_parser("batch", parents=[parent], help="answer an OpenAI batch file (JSONL); rerun to resume")
    batch.add_argument("input", help="JSONL lines {custom_id, method, url, body} (url: /v1/chat/completions or "
                                     "/v1/completions)")
    batch.add_argument("--output", "-o", required=True, help="results, appended as each request finishes")
    batch.add_argument("--errors", help="failed requests and bad lines (default: OUTPUT's name + .errors.jsonl)")
    _add_model_args(batch, context_default="8192, or the model's maximum if smaller")
    batch.add_argument("--max-batch", type=int, default=16, help="sequences generating at once (default 16)")
    batch.add_argument("--kv-cache-mib", type=int, default=1024, help="KV cache memory (default 1024 MiB)")
    batch.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    batch.add_argument("--no-prefix-cache", action="store_true",
                       help="read every prompt whole (default: requests that start alike reuse the cached start)")
    batch.set_defaults(func=cmd_batch)


def cmd_audit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .safety.audit import AuditLog, summarize

    if not Path(args.db).is_file():
        raise InvalidParameterError(f"no audit log at {args.db} (gemmakit serve --audit-db writes one)")
    log = AuditLog(args.db)
    since = time.time() - args.since_days * 86400 if args.since_days else None
    rows = list(log.rows(since))
    log.close()
    if args.export:
        with (sys.stdout if args.export == "-" else open(args.export, "w", encoding="utf-8")) as out:
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        return 0
    summary = summarize(rows)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{len(rows)} requests" + (f" in the last {args.since_days:g} days" if args.since_days else ""))
    for day, d in summary["days"].items():
        flags = ", ".join(f"{c} {n}" for c, n in sorted(d["flags"].items(), key=lambda kv: -kv[1])) or "none"
        actions = ", ".join(f"{a} {n}" for a, n in sorted(d["actions"].items()))
        print(f"  {day}: {d['requests']} requests; flags: {flags}; actions: {actions}")
    r = summary["reports"]
    cats = ", ".join(f"{c} {n}" for c, n in sorted(r["categories"].items(), key=lambda kv: -kv[1]))
    print(f"reports: {r['up']} up, {r['down']} down" + (f" ({cats})" if cats else ""))
    return 0


def _add_audit_parser(sub, parent: argparse.ArgumentParser) -> None:
    audit = sub.add_parser("audit", parents=[parent], help="summarize or export a server's audit log")
    audit.add_argument("db", help="the SQLite file of gemmakit serve --audit-db")
    audit.add_argument("--since-days", type=float, help="only the last DAYS days")
    audit.add_argument("--export", metavar="FILE", help="write the rows (with their reports) as JSONL ('-': stdout)")
    audit.add_argument("--json", action="store_true", help="the summary as JSON")
    audit.set_defaults(func=cmd_audit)


def build_parser() -> argparse.ArgumentParser:
    parent = _verbose_parent()
    parser = argparse.ArgumentParser(prog="gemmakit", description="Run Gemma models locally.", parents=[parent])
    parser.add_argument("--version", "-V", action="version", version=f"gemmakit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[parent], help="complete a prompt, streaming the answer to stdout")
    run.add_argument("prompt", nargs="?", help="the prompt; '-' or none reads it from standard input")
    run.add_argument("--json", action="store_true", help="print one JSON completion instead of streaming")
    _add_model_args(run)
    _add_sampling_args(run)
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", parents=[parent], help="interactive multi-turn chat (/help for commands)")
    chat.add_argument("--system", help="system prompt")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    _add_serve_parser(sub, parent)
    _add_audit_parser(sub, parent)
    _add_batch_parser(sub, parent)

    bench = sub.add_parser("bench", parents=[parent], help="measure load time, memory, prefill and decode speed")
    _add_model_args(bench)
    bench.add_argument("--prompt-tokens", type=int, default=512)
    bench.add_argument("--decode-tokens", type=int, default=64)
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--random-weights", metavar="CONFIG",
                       help="benchmark a published shape with random weights instead of a file (e2b)")
    bench.set_defaults(func=cmd_bench)

    models = sub.add_parser("models", parents=[parent], help="list the default model and the models folder")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=cmd_models)

    quantize = sub.add_parser("quantize", parents=[parent],
                              help="write a Hugging Face folder as a GGUF in llama.cpp's layout (Q8_0, Q4_K_M, ...)")
    quantize.add_argument("folder", help="a Hugging Face model folder (config.json, safetensors, tokenizer)")
    quantize.add_argument("--output", "-o", required=True, help="the GGUF file to write")
    quantize.add_argument("--type", default="Q8_0", choices=GGUF_TYPE_CHOICES,
                          help="tensor type (default Q8_0); the K-quant mixes use llama.cpp's quantizer "
                               "(llama-cpp-python)")
    quantize.add_argument("--threads", "-t", type=int, help=f"CPU threads, 1-{os.cpu_count()} (default: all cores)")
    quantize.set_defaults(func=cmd_quantize)

    show = sub.add_parser("show", parents=[parent], help="architecture, quantization, context, chat template")
    show.add_argument("model_arg", nargs="?", metavar="MODEL", help="path or name (default: the bundled model)")
    show.add_argument("--model", "-m", help=argparse.SUPPRESS)
    show.add_argument("--template", action="store_true", help="print the whole chat template")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "verbose", False):
        import logging

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except GemmakitError as exc:
        sys.stdout.flush()
        print(f"gemmakit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
