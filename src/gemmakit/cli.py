"""The ``gemmakit`` command: run, chat, bench."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Iterator

from .errors import GemmakitError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="path of a GGUF file (default: bundled Gemma 3 270M base model)")
    p.add_argument("--threads", "-t", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--context-length", type=int, help="most tokens per sequence (default: the model's maximum)")
    p.add_argument("--quant", default="auto", choices=["auto", "int8", "fp32", "bf16"],
                   help="GGUF weights in memory: auto/int8 keep them quantized (default), fp32/bf16 dequantize")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=256, help="most new tokens (default 256)")
    g.add_argument("--temperature", type=float, default=1.0, help="0 for greedy (default 1.0)")
    g.add_argument("--top-k", type=int, default=64, help="0 disables (default 64, Gemma's recommendation)")
    g.add_argument("--top-p", type=float, default=0.95, help="default 0.95")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, help="report each token's logprob and this many alternatives")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "seed": args.seed,
        "stop": args.stop,
        "ignore_eos": args.ignore_eos,
        "logprobs": args.logprobs,
    }


@contextmanager
def _spinner(message: str, delay: float = 0.3) -> Iterator[None]:
    """Show a spinner on stderr (a terminal only) if the block takes longer than ``delay`` seconds."""
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

    with _spinner("Loading model"):
        return load(args.model, context_length=args.context_length, threads=args.threads, quant=args.quant)


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


def cmd_run(args: argparse.Namespace) -> int:
    llm = _load(args)
    sampling = _sampling(args)
    if args.json:
        print(json.dumps(_completion_json(llm.generate(args.prompt, **sampling)), ensure_ascii=False))
        return 0
    sys.stdout.write(args.prompt)
    finish = None
    for ev in llm.stream(args.prompt, **sampling):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        finish = ev.finish_reason
    sys.stdout.write("\n")
    if args.verbose:
        print(f"[finish_reason: {finish}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    sampling = _sampling(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    print("Chat with the model. /reset clears the conversation, /exit quits.", file=sys.stderr)
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
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        reply = []
        try:
            for ev in llm.chat_stream(system + history, **sampling):
                sys.stdout.write(ev.text)
                sys.stdout.flush()
                reply.append(ev.text)
        except GemmakitError as exc:
            history.pop()
            print(f"error: {exc}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            print("\n(interrupted)", file=sys.stderr)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    result = run_bench(args.model, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                       threads=args.threads, random_weights=args.random_weights, quant=args.quant)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value:.3f}" if isinstance(value, float) else f"{key:>22}: {value}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from .errors import InvalidParameterError
    from .server import create_app

    keys = list(args.api_key or [])
    if args.api_keys_file:
        try:
            keys += [line.strip() for line in open(args.api_keys_file) if line.strip()]
        except OSError as exc:
            raise InvalidParameterError(f"--api-keys-file {args.api_keys_file}: {exc.strerror}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = _load(args)
    app = create_app(llm, model_name=args.model_name, api_keys=keys, max_batch=args.max_batch,
                     max_waiting=args.max_waiting, context_length=args.context_length,
                     kv_cache_bytes=args.kv_cache_mib * 2**20, log_prompts=args.log_prompts)
    # The engine thread and the event loop share the GIL. When a kernel call returns, the engine waits for the
    # loop to let go of it, by default up to 5 ms (the switch interval) while the loop writes a step's chunks;
    # 1 ms keeps that wait short next to a ~15-60 ms step.
    sys.setswitchinterval(0.001)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemmakit", description="Run Gemma models locally.")
    parser.add_argument("--verbose", "-v", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="complete a prompt, streaming the answer to stdout")
    run.add_argument("prompt")
    run.add_argument("--json", action="store_true", help="print one JSON completion instead of streaming")
    _add_model_args(run)
    _add_sampling_args(run)
    run.set_defaults(func=cmd_run)

    chat = sub.add_parser("chat", help="interactive multi-turn chat (/reset, /exit)")
    chat.add_argument("--system", help="system prompt")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", action="append", help="require this bearer key (repeatable)")
    serve.add_argument("--api-keys-file", help="file with one accepted key per line")
    serve.add_argument("--model-name", help="model id clients use (default: the file name)")
    serve.add_argument("--max-batch", type=int, default=8,
                       help="sequences generating at once, 1-64 (default 8); each holds a KV cache row")
    serve.add_argument("--max-waiting", type=int, default=64,
                       help="requests that may wait for a row (default 64); more get HTTP 429")
    serve.add_argument("--kv-cache-mib", type=int, default=1024,
                       help="KV cache memory (default 1024 MiB); bounds max-batch rows of context-length tokens")
    serve.add_argument("--log-prompts", action="store_true", help="include prompt text in the request log")
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="measure load time, memory, prefill and decode speed")
    _add_model_args(bench)
    bench.add_argument("--prompt-tokens", type=int, default=512)
    bench.add_argument("--decode-tokens", type=int, default=64)
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--random-weights", metavar="CONFIG",
                       help="benchmark a published shape with random weights instead of a file (e2b)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except GemmakitError as exc:
        print(f"gemmakit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
