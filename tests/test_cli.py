"""The gemmakit command, run as a user would run it (subprocesses on the bundled model)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

import gemmakit
from helpers import write_tiny_gguf
from serving import free_port


def gemmakit_cmd(*args: str, stdin: str | None = None, env: dict | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmakit", *args], capture_output=True, text=True, input=stdin,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_run_json_matches_api(llm) -> None:
    prompt = "The capital of France is"
    proc = gemmakit_cmd("run", prompt, "-n", "8", "--temperature", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    ref = llm.generate(prompt, max_tokens=8, temperature=0)
    assert out["text"] == ref.text and out["token_ids"] == ref.token_ids
    assert out["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 8


def test_same_seed_same_text_in_cli_and_api(llm) -> None:
    """One set of sampling defaults: a seeded run samples the same tokens from the CLI and the Python API."""
    proc = gemmakit_cmd("run", "Once upon a time", "-n", "12", "--seed", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    api = llm.generate("Once upon a time", max_tokens=12, seed=5)
    assert json.loads(proc.stdout)["token_ids"] == api.token_ids
    assert api.token_ids != llm.generate("Once upon a time", max_tokens=12, seed=6).token_ids  # it did sample


def test_run_streams_prompt_and_answer_with_stats(llm) -> None:
    prompt = "The capital of France is"
    proc = gemmakit_cmd("run", prompt, "-n", "8", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == prompt + llm.generate(prompt, max_tokens=8, temperature=0).text + "\n"
    # stderr: the token-limit marker, then the statistics line (stdout keeps only the text)
    assert "[answer cut at the 8-token limit: raise --max-tokens/-n for more]" in proc.stderr
    stats = re.search(r"\[(\d+) prompt tokens, (\d+) generated, ([\d.]+) tok/s, first token after ([\d.]+) s",
                      proc.stderr)
    assert stats, proc.stderr
    assert int(stats.group(1)) == len(llm.tokenizer.encode(prompt, add_bos=True)) and int(stats.group(2)) == 8
    assert float(stats.group(3)) > 0


def test_no_limit_marker_when_the_answer_ends_by_itself(llm) -> None:
    proc = gemmakit_cmd("run", "Hello", "-n", "8", "--temperature", "0", "--stop", " ")
    assert proc.returncode == 0, proc.stderr
    assert "answer cut" not in proc.stderr and "generated" in proc.stderr


@pytest.mark.parametrize("how", ["dash", "none"])
def test_prompt_from_stdin(llm, how) -> None:
    args = ["run", "-", "-n", "4", "--temp", "0"] if how == "dash" else ["run", "-n", "4", "--temp", "0"]
    proc = gemmakit_cmd(*args, stdin="The capital of France is\n")
    assert proc.returncode == 0, proc.stderr
    ref = llm.generate("The capital of France is", max_tokens=4, temperature=0).text
    assert proc.stdout == "The capital of France is" + ref + "\n"


def test_version_and_python_m() -> None:
    proc = gemmakit_cmd("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"gemmakit {gemmakit.__version__}"


def test_verbose_before_or_after_the_subcommand(llm) -> None:
    for args in (["-v", "run", "Hi", "-n", "1"], ["run", "Hi", "-n", "1", "-v"]):
        proc = gemmakit_cmd(*args)
        assert proc.returncode == 0, proc.stderr
        assert "INFO gemmakit.llm: loaded" in proc.stderr


def test_short_flags_reach_the_model(model_path) -> None:
    proc = gemmakit_cmd("run", "Hi", "-m", str(model_path), "-c", "64", "-t", "1", "-n", "2", "-s", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["usage"]["completion_tokens"] == 2
    too_long = gemmakit_cmd("run", "Hi", "-c", "8", "-n", "20")
    assert too_long.returncode == 2 and "context holds 8" in too_long.stderr


@pytest.mark.parametrize("args,fragment", [
    (["--threads", "999"], "--threads 999: must be in [1, "),
    (["--temperature", "-2"], "--temperature"),
    (["--top-p", "7"], "--top-p"),
    (["-n", "0"], "--max-tokens"),
    (["--context-length", "0"], "--context-length 0"),
])
def test_bad_flags_fail_before_loading(args, fragment) -> None:
    start = time.perf_counter()
    # A missing model file would fail at load: failing on the flag instead proves it was checked first.
    proc = gemmakit_cmd("run", "Hi", "-m", "/nonexistent.gguf", *args)
    assert proc.returncode == 2
    assert fragment in proc.stderr and "nonexistent" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""  # nothing echoed before the error
    assert proc.stderr.count("\n") == 1 and time.perf_counter() - start < 30


def test_missing_model_is_one_clear_line(tmp_path) -> None:
    proc = gemmakit_cmd("run", "hi", "--model", str(tmp_path / "nope.gguf"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "nope.gguf" in proc.stderr and "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_streamed_logprobs_are_a_table(llm) -> None:
    proc = gemmakit_cmd("run", "The capital of France is", "-n", "3", "--temp", "0", "--logprobs", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("token ")))
    rows = lines[header + 1 : header + 4]
    ref = llm.generate("The capital of France is", max_tokens=3, temperature=0, logprobs=2)
    for row, lp in zip(rows, ref.logprobs):
        token = json.dumps(llm.tokenizer.decode([lp.token_id]), ensure_ascii=False)
        assert row.startswith(token) and f"{lp.logprob:.4f}" in row and row.count(", ") >= 1


def test_models_lists_the_default_with_paths_and_sizes(model_path, tmp_path) -> None:
    (tmp_path / "mine.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    proc = gemmakit_cmd("models", "--json", env={"GEMMAKIT_MODELS": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    entries = json.loads(proc.stdout)
    bundled = entries[0]
    assert bundled["size"] == model_path.stat().st_size == sum(os.path.getsize(p) for p in bundled["extra"]["parts"])
    assert entries[-1]["name"] == "mine" and entries[-1]["size"] == 104
    text = gemmakit_cmd("models", env={"GEMMAKIT_MODELS": str(tmp_path)}).stdout
    assert bundled["extra"]["parts"][0] in text and "253.1 MB" in text and str(tmp_path) in text


def test_the_bundled_model_is_read_in_place(tmp_path) -> None:
    """A new user's first run reads the model from the package's chunks: no second copy appears on disk."""
    proc = gemmakit_cmd("run", "Hello", "-n", "2", env={"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.rglob("*.gguf"))


def test_show_describes_the_model(model_path, tmp_path) -> None:
    proc = gemmakit_cmd("show", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "gemma3" and info["context_length"] == 32768 and info["layers"] == 18
    assert "Q4_K" in info["quantization"] and "Q8_0" in info["quantization"]
    assert 260e6 < info["parameters"] < 280e6
    assert info["sampling_defaults"]["top_k"] == 64 and info["sampling_defaults"]["top_p"] == 0.95
    text = gemmakit_cmd("show", str(model_path)).stdout
    assert "architecture: gemma3" in text and "parameters: 268.1 M" in text
    assert "none (the family's built-in)" in text  # this GGUF ships no template: Gemma's own format is used
    templated = write_tiny_gguf(tmp_path / "t.gguf", chat_template="{{ bos_token }}{% for m in messages %}...")
    shown = gemmakit_cmd("show", str(templated), "--template")
    assert shown.returncode == 0 and shown.stdout.rstrip().endswith("{% for m in messages %}...")


def test_chat_commands() -> None:
    script = "/help\nHello\n/system You are terse.\n/system\n/nonsense\nHi again\n/clear\n/bye\nnever sent\n"
    proc = gemmakit_cmd("chat", "-n", "4", "--temperature", "0", "--stop", "\n", stdin=script)
    assert proc.returncode == 0, proc.stderr
    assert "/system [TEXT]" in proc.stderr  # the help text
    assert "(system prompt set; conversation cleared)" in proc.stderr
    assert "(system prompt: 'You are terse.')" in proc.stderr
    assert "unknown command /nonsense" in proc.stderr and "(conversation cleared)" in proc.stderr
    assert "base model" in proc.stderr  # the bundled model is labelled for what it is
    # Two answers (one line each: "\n" stops them); the commands and the line after /bye went to no model.
    assert proc.stdout.count("\n") == 2


def test_chat_has_line_editing_and_history(tmp_path) -> None:
    """In a terminal, Up recalls the previous line (readline), instead of typing ^[[A."""
    import pty

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    pid, fd = pty.fork()
    if pid == 0:  # the child: gemmakit chat on a terminal
        os.execvpe(sys.executable, [sys.executable, "-m", "gemmakit", "chat", "-n", "2", "--temp", "0"], env)
    output = b""

    def read_until(marker: bytes, limit: float = 120) -> None:
        nonlocal output
        deadline = time.time() + limit
        while marker not in output and time.time() < deadline:
            try:
                output += os.read(fd, 4096)
            except OSError:
                break

    # Each line is typed once the prompt is back: readline has the terminal then (typed earlier, the terminal
    # itself would echo the keys).
    read_until(b"> ")
    os.write(fd, b"/system first\r")
    read_until(b"conversation cleared)\r\n> ")
    output = b""
    os.write(fd, b"\x1b[A\r")  # Up, Enter: the same line again
    read_until(b"conversation cleared)\r\n> ")
    os.write(fd, b"/quit\r")
    os.waitpid(pid, 0)
    assert b"^[[A" not in output and b"system prompt set" in output
    assert "/system first" in (tmp_path / "gemmakit" / "chat_history").read_text()


def test_serve_refuses_a_busy_port_before_loading() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.perf_counter()
        proc = gemmakit_cmd("serve", "--port", str(port), "-m", "/nonexistent.gguf")
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "nonexistent" not in proc.stderr and time.perf_counter() - start < 30


def test_serve_says_where_it_listens() -> None:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemmakit", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        while line and "Serving" not in line:
            line = proc.stderr.readline()
        assert line.startswith(f"Serving gemma-3-270m-q4_k_m at http://127.0.0.1:{port}/v1"), line
        deadline = time.time() + 60
        while True:  # the line comes as uvicorn starts: it answers a moment later
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["status"] == "ok"
                break
            except httpx.TransportError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
