"""The gemmakit command, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys


def gemmakit(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gemmakit.cli", *args], capture_output=True, text=True, input=stdin, timeout=300
    )


def test_run_json_matches_api(llm) -> None:
    prompt = "The capital of France is"
    proc = gemmakit("run", prompt, "-n", "8", "--temperature", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    ref = llm.generate(prompt, max_tokens=8, temperature=0)
    assert out["text"] == ref.text and out["token_ids"] == ref.token_ids
    assert out["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 8


def test_run_streams_prompt_and_answer(llm) -> None:
    prompt = "The capital of France is"
    proc = gemmakit("run", prompt, "-n", "8", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == prompt + llm.generate(prompt, max_tokens=8, temperature=0).text + "\n"


def test_chat_session_with_reset() -> None:
    proc = gemmakit("chat", "-n", "4", "--temperature", "0", stdin="Hello\n/reset\nHi again\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert "(conversation cleared)" in proc.stderr
    assert "base model" in proc.stderr  # the bundled model is labelled for what it is


def test_missing_model_is_one_clear_line(tmp_path) -> None:
    proc = gemmakit("run", "hi", "--model", str(tmp_path / "nope.gguf"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "nope.gguf" in proc.stderr and "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_parameter_is_one_clear_line() -> None:
    proc = gemmakit("run", "hi", "--temperature", "-2")
    assert proc.returncode == 2
    assert "temperature" in proc.stderr and "Traceback" not in proc.stderr
