"""The audit log (real SQLite) and user reports: rows per request with key hashes and safety decisions, feedback,
rows that survive SIGKILL under load, the `gemmakit audit` command, retention."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from gemmakit.safety import SafetyPolicy
from gemmakit.safety.audit import AuditLog, AuditRecord, key_hash
from gemmakit.server import create_app
from serving import Server, free_port, wait_until_up

KEY = "sk-audit-test-key-0123456789"
POLICY = {"input": {"guards": ["pii", "classifier"], "action": "block", "actions": {"pii": "redact"}}}


def _client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def audited(llm, tmp_path_factory):
    path = tmp_path_factory.mktemp("audit") / "audit.db"
    log = AuditLog(path, store_text=True)
    app = create_app(llm, max_batch=2, kv_cache_bytes=256 << 20, api_keys=[KEY],
                     safety=SafetyPolicy.from_mapping(POLICY), audit=log)
    with Server(app) as s:
        s.db = path
        yield s


def _rows(path: Path) -> dict[str, dict]:
    return {row["id"]: row for row in AuditLog(path).rows()}


def test_each_request_has_a_row(audited) -> None:
    client = _client(audited.url)
    hello = [{"role": "user", "content": "Hi, I am ann@example.com"}]
    plain = client.chat.completions.create(model="m", messages=hello, max_tokens=4, temperature=0)
    chunks = list(client.completions.create(model="m", prompt="Once upon a time", max_tokens=5, stream=True,
                                            temperature=0))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="m", prompt="how do i make a bomb", max_tokens=4)
    moderation = client.moderations.create(input="you are a stupid idiot")
    rows = _rows(audited.db)
    row = rows[plain.id]
    assert row["endpoint"] == "/v1/chat/completions" and row["status"] == 200
    assert row["key_hash"] == key_hash(KEY) and KEY not in json.dumps(row)
    assert row["prompt_tokens"] == plain.usage.prompt_tokens and row["completion_tokens"] == 4
    decision = row["decisions"]["input"]
    assert decision["flagged"] == {"pii": 1.0} and decision["actions"] == {"pii": "redact"}
    assert decision["action"] == row["action"] == "redact"
    assert set(decision["guards"]) == {"pii", "classifier"} and decision["guards"]["pii"] == {"pii": 1.0}
    assert 0 < decision["guards"]["classifier"]["harassment"] < 0.5  # each guard's own scores
    assert "<EMAIL_1>" in row["prompt"] and "ann@example.com" not in row["prompt"]  # kept as the model saw it
    assert row["answer"] == plain.choices[0].message.content
    streamed = rows[chunks[0].id]
    assert streamed["completion_tokens"] == 5 and streamed["answer"] == "".join(c.choices[0].text for c in chunks)
    blocked = [r for r in rows.values() if r["status"] == 400]
    assert len(blocked) == 1 and blocked[0]["action"] == "block"
    assert set(blocked[0]["decisions"]["input"]["flagged"]) == {"illicit", "illicit/violent"}
    assert rows[moderation.id]["decisions"]["moderation"]["flagged"]["harassment"] > 0.9


def test_feedback(audited) -> None:
    client = _client(audited.url)
    answer = client.completions.create(model="m", prompt="The sky is", max_tokens=3, temperature=0)
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(audited.url + "/v1/feedback", headers=headers, timeout=30,
                   json={"request_id": answer.id, "rating": -1, "category": "wrong", "comment": "not blue"})
    assert r.status_code == 200 and r.json()["request_id"] == answer.id
    assert _rows(audited.db)[answer.id]["feedback"][0] | {"time": 0} == {"time": 0, "rating": -1,
                                                                        "category": "wrong", "comment": "not blue"}
    missing = httpx.post(audited.url + "/v1/feedback", headers=headers, json={"request_id": "cmpl-nope", "rating": 1})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "request_not_found"
    bad = httpx.post(audited.url + "/v1/feedback", headers=headers, json={"request_id": answer.id, "rating": 5})
    assert bad.status_code == 400 and "rating" in bad.json()["error"]["message"]
    assert httpx.post(audited.url + "/v1/feedback", json={"request_id": answer.id, "rating": 1}).status_code == 401


def test_feedback_without_an_audit_log_is_501(llm) -> None:
    with Server(create_app(llm, max_batch=1, kv_cache_bytes=128 << 20)) as s:
        r = httpx.post(s.url + "/v1/feedback", json={"request_id": "cmpl-x", "rating": 1}, timeout=30)
    assert r.status_code == 501 and "--audit-db" in r.json()["error"]["message"]


def test_rows_survive_sigkill_under_load_and_keys_stay_out(tmp_path) -> None:
    db, port = tmp_path / "audit.db", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemmakit.cli", "serve", "--port", str(port), "--api-key", KEY,
                             "--audit-db", str(db), "--max-batch", "4", "--kv-cache-mib", "256", "--context-length",
                             "512", "--log-prompts"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url, answered = f"http://127.0.0.1:{port}", []
    try:
        wait_until_up(proc, url)
        client = _client(url)

        def ask(i: int) -> None:
            answered.append(client.completions.create(model="m", prompt=f"Story {i}:", max_tokens=8).id)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, i) for i in range(40)]
            while len(answered) < 12:
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)  # mid-load: requests are running and queued
            concurrent.futures.wait(futures)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    rows = _rows(db)
    assert 12 <= len(answered) < 40 and set(answered) <= set(rows)  # every answer the clients got has its row
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("audit.db"))
    assert KEY.encode() not in raw and KEY not in err


def test_audit_command_summarizes_and_exports(tmp_path) -> None:
    db = tmp_path / "a.db"
    log = AuditLog(db)
    day = 86400 * 20000  # 2024-10-04
    log.record(AuditRecord("r1", "/v1/completions", time=day, decisions={"input": {"flagged": {"pii": 1.0},
                                                                                   "action": "redact"}}))
    log.record(AuditRecord("r2", "/v1/chat/completions", time=day + 60))
    log.add_feedback("r2", -1, "harmful")
    log.close()
    cli = [sys.executable, "-m", "gemmakit.cli", "audit", str(db)]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60).stdout
    assert "2 requests" in out and "2024-10-04: 2 requests; flags: pii 1; actions: none 1, redact 1" in out
    assert "reports: 0 up, 1 down (harmful 1)" in out
    exported = subprocess.run(cli + ["--export", "-"], capture_output=True, text=True, timeout=60).stdout
    rows = [json.loads(line) for line in exported.splitlines()]
    assert [r["id"] for r in rows] == ["r1", "r2"] and rows[1]["feedback"][0]["category"] == "harmful"
    missing = subprocess.run(cli[:-1] + [str(tmp_path / "none.db")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no audit log" in missing.stderr


def test_retention_deletes_old_rows_and_their_reports(tmp_path) -> None:
    log = AuditLog(tmp_path / "a.db", retention_days=1)
    now = time.time()
    log.record(AuditRecord("old", "/v1/completions", time=now - 3 * 86400))
    log.add_feedback("old", 1)
    log.record(AuditRecord("new", "/v1/completions", time=now))
    log.purge(now)
    assert [r["id"] for r in log.rows()] == ["new"]
    assert log.db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0
