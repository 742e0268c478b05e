"""The server's Files and Batches APIs through the official openai client: a batch run to completion, a cancel that
keeps the lines done, a server killed and restarted mid-batch, and the errors."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from gemmakit.server import create_app
from gemmakit.server.limits import ServerLimits
from serving import Server, free_port, wait_until_up

FINAL = ("completed", "failed", "cancelled", "expired")


def _lines(n: int, max_tokens: int, prefix: str = "c") -> list[str]:
    return [json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": max_tokens,
                                 "temperature": 0}}) for i in range(n)]


def _upload(client: openai.OpenAI, lines: list[str]):
    return client.files.create(file=("in.jsonl", io.BytesIO(("\n".join(lines) + "\n").encode())), purpose="batch")


def _wait(client: openai.OpenAI, batch_id: str, until, timeout: float = 300):
    deadline = time.time() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert time.time() < deadline, f"batch stuck at {batch.status} {batch.request_counts}"
        time.sleep(0.1)


def _results(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()] if file_id else []


@pytest.fixture(scope="module")
def server(llm, tmp_path_factory):
    app = create_app(llm, max_batch=4, kv_cache_bytes=256 << 20, context_length=512,
                     data_dir=tmp_path_factory.mktemp("data"), limits=ServerLimits(max_file_bytes=64 << 10))
    with Server(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_batch_runs_to_completion(client) -> None:
    uploaded = _upload(client, _lines(6, 5) + ["not json"])
    assert uploaded.purpose == "batch" and client.files.retrieve(uploaded.id).bytes == uploaded.bytes
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "t1"})
    assert batch.status == "validating" and batch.metadata == {"job": "t1"}
    done = _wait(client, batch.id, lambda b: b.status in FINAL)
    assert done.status == "completed" and done.completed_at is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (7, 6, 1)
    results = _results(client, done.output_file_id)
    assert sorted(r["custom_id"] for r in results) == [f"c{i}" for i in range(6)]
    one = next(r for r in results if r["custom_id"] == "c3")
    alone = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Count to 3."}],
                                           max_tokens=5, temperature=0)
    assert one["response"]["body"]["choices"][0]["message"]["content"] == alone.choices[0].message.content
    assert _results(client, done.error_file_id)[0]["error"]["code"] == "invalid_json"
    assert batch.id in [b.id for b in client.batches.list(limit=100).data]
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_cancel_keeps_the_lines_done(client) -> None:
    uploaded = _upload(client, _lines(40, 48, prefix="k"))
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    _wait(client, batch.id, lambda b: b.request_counts.completed >= 2)
    assert client.batches.cancel(batch.id).status == "cancelling"
    done = _wait(client, batch.id, lambda b: b.status in FINAL)
    assert done.status == "cancelled" and done.cancelled_at is not None
    results = _results(client, done.output_file_id)
    assert 2 <= len(results) == done.request_counts.completed < 40
    assert len({r["custom_id"] for r in results}) == len(results)
    with pytest.raises(openai.BadRequestError, match="only a running batch"):
        client.batches.cancel(batch.id)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"}, "not an uploaded file"),
    ({"input_file_id": "file-nope", "endpoint": "/v1/embeddings"}, "this server batches"),
])
def test_bad_batches_are_400(client, kwargs, fragment) -> None:
    with pytest.raises(openai.BadRequestError, match=fragment):
        client.batches.create(completion_window="24h", **kwargs)


def test_file_and_batch_errors(server, client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError, match="purpose 'batch' only"):
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    big = httpx.post(server.url + "/v1/files", files={"file": ("big.jsonl", b"x" * (80 << 10))},
                     data={"purpose": "batch"}, timeout=30)
    assert big.status_code == 413


def test_without_a_data_dir_the_batch_api_is_501(llm) -> None:
    with Server(create_app(llm, max_batch=1, kv_cache_bytes=128 << 20)) as s:
        r = httpx.get(s.url + "/v1/batches", timeout=30)
    assert r.status_code == 501 and "--data-dir" in r.json()["error"]["message"]


def test_a_restarted_server_resumes_its_batch(tmp_path) -> None:
    port, data = free_port(), tmp_path / "data"
    cmd = [sys.executable, "-m", "gemmakit.cli", "serve", "--port", str(port), "--data-dir", str(data),
           "--max-batch", "4", "--kv-cache-mib", "256", "--context-length", "512"]
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_up(proc, url)
        uploaded = _upload(client, _lines(24, 24, prefix="r"))
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        _wait(client, batch.id, lambda b: b.request_counts.completed >= 3)
        proc.send_signal(signal.SIGKILL)  # mid-batch: requests are in flight
        proc.wait(timeout=30)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_until_up(proc, url)
        done = _wait(client, batch.id, lambda b: b.status in FINAL)
        assert done.status == "completed" and done.request_counts.completed == 24
        answered = [r["custom_id"] for r in _results(client, done.output_file_id)]
        assert sorted(answered) == sorted(f"r{i}" for i in range(24))  # each exactly once
    finally:
        proc.kill()
        proc.wait(timeout=30)
