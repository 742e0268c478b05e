"""`gemmakit batch`: OpenAI batch files answered offline, each custom_id exactly once however often the job is
killed, bad lines in the error file, the same answers as the server."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemmakit.batch import run_batch
from gemmakit.batch.files import done_ids

CLI = [sys.executable, "-m", "gemmakit.cli", "batch"]


def _requests(n: int, max_tokens: int) -> list[dict]:
    out = []
    for i in range(n):
        if i % 2:
            body = {"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": max_tokens,
                    "temperature": 0}
            out.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        else:
            body = {"model": "any", "prompt": f"Story number {i}:", "max_tokens": max_tokens, "temperature": 0}
            out.append({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body})
    return out


BAD_LINES = [
    '{"custom_id": "bad-method", "method": "GET", "url": "/v1/completions", "body": {}}',
    "this is not json",
    '{"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}',
    '{"custom_id": "bad-temp", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "temperature": 9}}',
    '{"custom_id": "bad-stream", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "stream": true}}',
]


def _write_input(path: Path, requests: list[dict], bad: list[str] = BAD_LINES) -> Path:
    lines = [json.dumps(r) for r in requests]
    for k, line in enumerate(bad):  # spread among the good ones
        lines.insert(3 * k + 1, line)
    path.write_text("\n".join(lines) + "\n")
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_batch_answers_as_the_server_and_files_bad_lines(llm, tmp_path) -> None:
    source = _write_input(tmp_path / "in.jsonl", _requests(6, 6))
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    summary = run_batch(llm, source, out, err, max_batch=4, context_length=512, kv_cache_bytes=128 << 20,
                        show_progress=False)
    assert (summary.total, summary.skipped, summary.succeeded, summary.failed) == (11, 0, 6, 5)
    results = {r["custom_id"]: r for r in _lines(out)}
    assert sorted(results) == [f"req-{i}" for i in range(6)]
    story = results["req-0"]["response"]
    assert story["status_code"] == 200 and story["request_id"] == story["body"]["id"]
    assert story["body"]["choices"][0]["text"] == llm.generate("Story number 0:", max_tokens=6, temperature=0).text
    errors = {e["custom_id"]: e for e in _lines(err)}
    assert set(errors) == {"bad-method", None, "bad-url", "bad-temp", "bad-stream"}
    assert errors["bad-temp"]["response"]["status_code"] == 400 and errors["bad-temp"]["error"] is None
    assert "temperature" in errors["bad-temp"]["response"]["body"]["error"]["message"]
    assert errors[None]["error"] == {"code": "invalid_json", "line": 5, "message": errors[None]["error"]["message"]}
    assert errors["bad-stream"]["error"]["code"] == "invalid_request" and errors["bad-stream"]["response"] is None
    again = run_batch(llm, source, out, err, max_batch=4, context_length=512, kv_cache_bytes=128 << 20,
                      show_progress=False)
    assert (again.skipped, again.succeeded, again.failed) == (11, 0, 0)
    assert len(_lines(out)) == 6 and len(_lines(err)) == 5  # nothing written twice


def test_repeated_custom_ids_are_refused_before_starting(tmp_path) -> None:
    requests = _requests(3, 2)
    requests[2]["custom_id"] = "req-0"
    source = _write_input(tmp_path / "in.jsonl", requests, bad=[])
    proc = subprocess.run(CLI + [str(source), "-o", str(tmp_path / "out.jsonl")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "'req-0'" in proc.stderr and "more than once" in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_a_half_written_last_line_is_dropped_and_redone(tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"custom_id": "a", "response": {}, "error": null}\n{"custom_id": "b", "resp')
    assert done_ids(out) == {"a"} and out.read_text().endswith("null}\n")
    (tmp_path / "other.jsonl").write_text("hello\n")
    with pytest.raises(Exception, match="not a batch result file"):
        done_ids(tmp_path / "other.jsonl")


def test_killed_at_random_points_every_request_is_answered_once(llm, tmp_path) -> None:
    requests = _requests(30, 12)
    source = _write_input(tmp_path / "in.jsonl", requests)
    out, err = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    cmd = CLI + [str(source), "-o", str(out), "-q", "--max-batch", "4", "-c", "512", "--kv-cache-mib", "128"]
    rng, kills = random.Random(7), 0
    for attempt in range(12):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # Kill while loading (the first try), or once a few more results have landed.
        target = len(_lines_raw(out)) + rng.randint(1, 6)
        deadline = time.time() + (0.5 if attempt == 0 else 120)
        while proc.poll() is None and time.time() < deadline and len(_lines_raw(out)) < target:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        if proc.returncode == 0:
            break
    else:
        assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    assert kills >= 3
    answered = [r["custom_id"] for r in _lines(out)]
    failed = [e["custom_id"] for e in _lines(err)]
    assert sorted(answered) == sorted(r["custom_id"] for r in requests)  # each exactly once
    assert sorted(failed, key=str) == sorted(["bad-method", None, "bad-url", "bad-temp", "bad-stream"], key=str)
    reference = run_batch(llm, source, tmp_path / "ref.jsonl", tmp_path / "ref.err.jsonl", max_batch=4,
                          context_length=512, kv_cache_bytes=128 << 20, show_progress=False)
    assert reference.succeeded == 30
    texts = {r["custom_id"]: r["response"]["body"]["choices"][0] for r in _lines(out)}
    ref = {r["custom_id"]: r["response"]["body"]["choices"][0] for r in _lines(tmp_path / "ref.jsonl")}
    assert texts == ref  # greedy answers do not depend on what ran beside them


def _lines_raw(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


def _engine_request(engine, llm, prompt: list[int], tokens: int, priority: int):
    """Submit straight to an engine (``priority`` 1: batch work)."""
    return engine.submit(prompt, llm.sampling_params(max_tokens=tokens, temperature=0, ignore_eos=True),
                         priority=priority)


def test_prompt_turns_and_admission_put_interactive_requests_first(llm) -> None:
    from gemmakit.engine import Engine
    from gemmakit.engine.engine import _Request

    engine = Engine(llm.model, llm.tokenizer, llm.stop_token_ids, 256, max_batch=3)
    engine.shutdown()  # the step loop stops: the scheduling methods are driven by hand below

    def request(n: int, priority: int) -> _Request:
        return _Request(list(range(2, 2 + n)), None, None, priority=priority)

    batch_a, batch_b, interactive = request(300, 1), request(300, 1), request(5, 0)
    engine._waiting.extend([batch_a, batch_b, interactive])
    engine._rows = [None, None]
    engine._admit()
    assert engine._rows == [interactive, batch_a] and list(engine._waiting) == [batch_b]
    assert engine._prompt_turns() == [interactive]  # batch prompts wait while it reads its own
    interactive.prefilled = 5
    assert engine._prompt_turns() == [batch_a]


def test_interactive_requests_are_admitted_before_waiting_batch_work(llm) -> None:
    from gemmakit.engine import Engine

    engine = Engine(llm.model, llm.tokenizer, llm.stop_token_ids, 256, max_batch=1)
    try:
        first = _engine_request(engine, llm, llm.tokenizer.encode("Once", add_bos=True), 24, priority=0)
        batch = _engine_request(engine, llm, llm.tokenizer.encode("Batch", add_bos=True), 2, priority=1)
        interactive = _engine_request(engine, llm, llm.tokenizer.encode("Now", add_bos=True), 2, priority=0)
        list(first)
        events = iter(interactive)  # one iterator: dropping a stream's iterator cancels its request
        next(events)
        # The one row went to the interactive request although the batch request queued before it (in arrival
        # order the batch request would be running or done by now).
        assert batch._request.row is None and batch._request.prefilled == 0
        assert len(list(events)) == 1 and len(list(batch)) == 2
    finally:
        engine.shutdown()
