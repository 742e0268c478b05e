"""gemmakit serve --ray: two replicas of the default model on a local Ray instance, behind one ingress.

One `gemmakit serve --ray` process for the module (Ray and two replicas take ~30 s to start on 2 cores), driven
with the official openai client and httpx over loopback; a single in-process server with the same model is the
reference for answers and errors. The last test stops the ingress and checks that no Ray process survives it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'gemmakit[ray]'")
psutil = pytest.importorskip("psutil")

import gemmakit  # noqa: E402
from gemmakit.safety.audit import AuditLog, key_hash  # noqa: E402
from gemmakit.server import create_app  # noqa: E402
from serving import Server, free_port  # noqa: E402

openai = pytest.importorskip("openai")

KEY = "ray-test-key"
# Per replica: a burst of requests fills the wait queue before the engine's next step moves any into a row, so
# each replica takes at least MAX_WAITING of a burst: 32 over both, enough for 20 concurrent requests.
MAX_BATCH, MAX_WAITING = 4, 16
AUTH = {"Authorization": f"Bearer {KEY}"}


class RayServer:
    """The `gemmakit serve --ray` subprocess (stderr to a file: Ray logs enough to fill a pipe)."""

    def __init__(self, flags: list[str]) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.proc = subprocess.Popen([sys.executable, "-m", "gemmakit", "serve", "--ray", "--port", str(self.port),
                                      "--shutdown-timeout", "5", *flags],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def wait_up(self, replicas: int = 2, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).json().get("replicas") == replicas:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            assert self.proc.poll() is None, self.output()
            assert time.time() < deadline, "the Ray server did not come up:\n" + self.output()
            time.sleep(0.5)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def replica_processes(self) -> list[psutil.Process]:
        return [p for p in self.descendants() if "ServeReplica" in " ".join(_cmdline(p))]

    def kill(self) -> None:
        procs = self.descendants()
        self.proc.kill()
        kill_all(procs)


def kill_all(procs: list[psutil.Process]) -> None:
    """Kill what is left of a process tree (its processes listed while its root was alive)."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


@pytest.fixture(scope="module")
def audit_db(tmp_path_factory):
    return tmp_path_factory.mktemp("ray-audit") / "audit.db"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ray-data")


@pytest.fixture(scope="module")
def ray_server(audit_db, data_dir):
    server = RayServer(["--replicas", "2", "--replica-cpus", "1", "--api-key", KEY, "--max-batch", str(MAX_BATCH),
                        "--max-waiting", str(MAX_WAITING), "--audit-db", str(audit_db), "--data-dir", str(data_dir)])
    try:
        server.wait_up()
        yield server
    finally:
        if server.proc.poll() is None:
            server.kill()


@pytest.fixture(scope="module")
def single_server(model_path):
    """The reference: one gemmakit serve app (one thread, as each replica) with the same key and limits."""
    llm = gemmakit.load(model_path, threads=1)
    app = create_app(llm, api_keys=[KEY], max_batch=MAX_BATCH, max_waiting=MAX_WAITING,
                     prebuild_grammar_vocab=False)
    with Server(app) as server:
        yield server


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, text: str, max_tokens: int = 12):
    raw = client.chat.completions.with_raw_response.create(
        model="gemma", messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0)
    return raw.headers.get("x-gemmakit-replica"), raw.parse().choices[0].message.content


def test_health_reports_the_live_replicas(ray_server):
    health = httpx.get(ray_server.url + "/health").json()
    assert health == {"status": "ok", "replicas": 2, "auth": True}
    replicas = ray_server.replica_processes()
    assert len(replicas) == 2
    # The engines run at the ingress's priority, not at the nice 15 Ray gives its workers.
    assert {p.nice() for p in replicas} == {psutil.Process(ray_server.proc.pid).nice()}


def test_the_local_instance_runs_without_the_helpers_nobody_reads(ray_server):
    """The autoscaler's monitor, the log monitor and the dashboard's API server are stopped (see LOCAL_IDLE_HELPERS);
    the processes that serve are there."""
    scripts = {Path(arg).name for p in ray_server.descendants() for arg in _cmdline(p)[:3] if arg.endswith(".py")}
    assert not scripts & {"monitor.py", "log_monitor.py", "dashboard.py"}, scripts
    names = " ".join(" ".join(_cmdline(p)) for p in ray_server.descendants())
    for needed in ("gcs_server", "raylet", "ServeController", "ServeReplica"):
        assert needed in names


def test_twenty_concurrent_requests_spread_over_both_replicas(ray_server, single_server):
    client = _client(ray_server.url)
    prompts = [f"Write one sentence about the number {i}." for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda p: _chat(client, p), prompts))
    replicas = [r for r, _ in answers]
    assert len(set(replicas)) == 2, replicas
    assert all(text for _, text in answers)
    # Greedy answers are the model's, whichever replica and however batched: the single server's.
    reference = _client(single_server.url)
    for prompt, (_, text) in list(zip(prompts, answers))[:4]:
        assert _chat(reference, prompt)[1] == text


def _stream_text(url: str, messages: list[dict]) -> tuple[str, str]:
    chunks = []
    raw = _client(url).chat.completions.with_raw_response.create(
        model="gemma", messages=messages, max_tokens=24, temperature=0, stream=True)
    for chunk in raw.parse():
        if chunk.choices and chunk.choices[0].delta.content:
            chunks.append(chunk.choices[0].delta.content)
    return raw.headers.get("x-gemmakit-replica", ""), "".join(chunks)


def test_streaming_through_ray_gives_the_single_servers_text(ray_server, single_server):
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Name three colours of the rainbow."}]
    replica, through_ray = _stream_text(ray_server.url, messages)
    assert replica
    _, alone = _stream_text(single_server.url, messages)
    assert through_ray == alone and len(through_ray) > 10


def test_a_conversation_stays_on_one_replica(ray_server):
    opening = [{"role": "user", "content": "Let us talk about lighthouses."}]
    homes = set()
    turns = list(opening)
    for follow_up in ("Why are they tall?", "And who kept them?", "Thank you."):
        replica, answer = _stream_text(ray_server.url, turns)
        homes.add(replica)
        turns += [{"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}]
    assert len(homes) == 1, homes
    # An explicit session id pins too: six requests, one replica (by chance alone: 1 in 32).
    pinned = {httpx.post(ray_server.url + "/v1/completions", headers={**AUTH, "x-session-id": "user-7"},
                         json={"model": "m", "prompt": f"Line {i}:", "max_tokens": 2}).headers["x-gemmakit-replica"]
              for i in range(6)}
    assert len(pinned) == 1, pinned


def _same_error(a: httpx.Response, b: httpx.Response) -> None:
    assert a.status_code == b.status_code
    assert a.json() == b.json()
    assert "error" in a.json() and a.json()["error"]["message"]


def test_auth_and_errors_as_the_single_server(ray_server, single_server):
    cases = [
        ("POST", "/v1/chat/completions", {}, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        ("GET", "/metrics", {}, None),
        ("POST", "/v1/chat/completions", AUTH, {"model": "m", "messages": []}),
        ("POST", "/v1/chat/completions", AUTH, {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": -1}),
        ("POST", "/v1/completions", AUTH, {"model": "m", "prompt": "x" * 10, "max_tokens": 10**9}),
        ("GET", "/v1/no-such-route", AUTH, None),
    ]
    for method, path, headers, body in cases:
        a = httpx.request(method, ray_server.url + path, headers=headers, json=body, timeout=60)
        b = httpx.request(method, single_server.url + path, headers=headers, json=body, timeout=60)
        _same_error(a, b)
    too_big = httpx.post(ray_server.url + "/v1/completions", headers=AUTH, content=b"x" * (20 * 2**20 + 1))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    models = httpx.get(ray_server.url + "/v1/models", headers=AUTH).json()
    assert models == httpx.get(single_server.url + "/v1/models", headers=AUTH).json()


def test_metrics_label_every_replica(ray_server):
    deadline = time.time() + 20
    while True:
        text = httpx.get(ray_server.url + "/metrics", headers=AUTH).text
        served = {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                  if line.startswith("gemmakit_generated_tokens_total{")
                  and float(line.rsplit(" ", 1)[1]) > 0}
        if len(served) == 2 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert len(served) == 2, text[-3000:]
    assert "gemmakit_ingress_live_replicas 2.0" in text
    assert 'gemmakit_ingress_requests_total{path="/{path:path}",status="200"}' in text


def _metric_sum(url: str, name: str) -> float:
    """A metric's value at the ingress, summed over its labels (the replicas', for replica metrics)."""
    text = httpx.get(url + "/metrics", headers=AUTH).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))


def test_a_client_that_leaves_cancels_its_generation_on_the_replica(ray_server):
    before = _metric_sum(ray_server.url, "gemmakit_requests_cancelled_total")
    body = {"model": "m", "prompt": "A very long story:", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", ray_server.url + "/v1/completions", headers=AUTH, json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert sum(line.startswith("data: ") for _, line in zip(range(8), lines)) >= 3
    deadline = time.time() + 20  # the engine notices the closed connection at its next step
    while _metric_sum(ray_server.url, "gemmakit_requests_cancelled_total") <= before:
        assert time.time() < deadline, "the replica never cancelled the abandoned generation"
        time.sleep(0.5)


def _post(url: str, max_tokens: int, topic: int = 0, session: str | None = None) -> httpx.Response:
    headers = {**AUTH, "x-session-id": session} if session else AUTH
    return httpx.post(url + "/v1/completions", headers=headers, timeout=300,
                      json={"model": "m", "prompt": f"Story {topic}: once upon a time", "max_tokens": max_tokens,
                            "ignore_eos": True})


def _sessions_on_each_replica(url: str, per_replica: int) -> list[str]:
    """Session ids that pin requests to the replicas, ``per_replica`` of them on each."""
    homes: dict[str, list[str]] = {}
    for i in range(64):
        replica = _post(url, 1, session=f"s{i}").headers["x-gemmakit-replica"]
        homes.setdefault(replica, []).append(f"s{i}")
        if len(homes) == 2 and all(len(ids) >= per_replica for ids in homes.values()):
            return [s for ids in homes.values() for s in ids[:per_replica]]
    raise AssertionError(f"64 session ids did not cover both replicas: {homes}")


def test_every_replica_full_is_a_429_with_retry_after(ray_server):
    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda topic: _post(ray_server.url, 48, topic), range(64)))
    codes = [a.status_code for a in answers]
    refused = [a for a in answers if a.status_code == 429]
    assert set(codes) <= {200, 429}, codes
    # A request is refused only after every replica refused it: both queues were full.
    assert refused and codes.count(200) >= 2 * MAX_WAITING, codes
    for a in refused:
        assert int(a.headers["retry-after"]) > 0 and a.json()["error"]["type"]
    assert {a.headers["x-gemmakit-replica"] for a in answers if a.status_code == 200}.__len__() == 2


def _stream_events(url: str, max_tokens: int, topic: int) -> list:
    """A streamed completion's data lines: JSON chunks, then '[DONE]'."""
    body = {"model": "m", "prompt": f"Tale {topic}: long ago", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", headers=AUTH, json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in r.iter_lines()
                if line.startswith("data: ")]


def _check_stream(events: list) -> None:
    """Whole, or cut by the replica's death: then an error event in OpenAI's shape, and [DONE] all the same."""
    assert events[-1] == "[DONE]", events[-3:]
    errors = [e for e in events[:-1] if "error" in e]
    if errors:
        assert errors[0]["error"]["code"] == "replica_failed" and events[-2] is errors[0]
    else:
        assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_one_audit_log_for_every_replica(ray_server, audit_db):
    """--audit-db with --ray: every replica's rows land in one file on the ingress's machine (an actor writes it),
    each committed before its response ended, and a report sent through any replica finds any replica's row."""
    client = _client(ray_server.url)

    def ask(i: int) -> tuple[str, str]:
        raw = client.chat.completions.with_raw_response.create(
            model="gemma", messages=[{"role": "user", "content": f"Name a color, number {i}."}], max_tokens=4,
            temperature=0)
        return raw.headers["x-gemmakit-replica"], raw.parse().id

    with ThreadPoolExecutor(8) as pool:  # 16 prompts: both replicas serve some (rendezvous and load)
        served = list(pool.map(ask, range(16)))
    assert len({replica for replica, _ in served}) == 2, served
    rows = _audit_rows(audit_db)  # read while the writer holds it (WAL)
    for _, rid in served:
        assert rows[rid]["status"] == 200 and rows[rid]["endpoint"] == "/v1/chat/completions"
        assert rows[rid]["key_hash"] == key_hash(KEY) and rows[rid]["completion_tokens"] >= 1
    # One session id pins every report to one replica, so the other replica's rows are reached across replicas.
    pinned = {**AUTH, "x-session-id": "audit-reports"}
    answered_by = set()
    for replica, rid in served:
        report = httpx.post(ray_server.url + "/v1/feedback", headers=pinned,
                            json={"request_id": rid, "rating": -1, "category": "wrong"}, timeout=60)
        assert report.status_code == 200, report.text
        answered_by.add(report.headers["x-gemmakit-replica"])
    assert len(answered_by) == 1
    missing = httpx.post(ray_server.url + "/v1/feedback", headers=AUTH, json={"request_id": "nope", "rating": 1})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "request_not_found"
    rows = _audit_rows(audit_db)
    assert all(rows[rid]["feedback"][0]["rating"] == -1 for _, rid in served)


def _audit_rows(path) -> dict[str, dict]:
    log = AuditLog(path)
    try:
        return {row["id"]: row for row in log.rows()}
    finally:
        log.close()


def test_a_batch_job_runs_over_the_replicas_and_its_records_stay_with_the_ingress(ray_server, single_server,
                                                                                   data_dir):
    client, single = _client(ray_server.url), _client(single_server.url)
    prompts = [f"Count to {i}." for i in range(6)]
    lines = [json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": p}], "max_tokens": 6, "temperature": 0}})
             for i, p in enumerate(prompts)]
    uploaded = client.files.create(file=("in.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.time() + 180
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "cancelled"):
        assert time.time() < deadline, f"batch stuck at {batch.status} {batch.request_counts}"
        time.sleep(0.3)
    assert batch.status == "completed" and batch.request_counts.completed == 6, batch
    results = {r["custom_id"]: r for r in map(json.loads, client.files.content(batch.output_file_id).text.splitlines())}
    for i, prompt in enumerate(prompts):
        alone = single.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=6, temperature=0)
        body = results[f"c{i}"]["response"]["body"]
        assert body["choices"][0]["message"]["content"] == alone.choices[0].message.content
    # The ingress keeps the records, in the data directory it was given (not the replicas).
    assert (data_dir / "batches.db").exists() and (data_dir / "files" / uploaded.id).exists()


def test_killing_a_replica_mid_load_loses_no_later_request(ray_server):
    retries_before = _metric_sum(ray_server.url, "gemmakit_ingress_retries_total")
    pool = ThreadPoolExecutor(8)
    # Half plain, half streamed; two plain requests pinned to each replica, so the victim holds some.
    sessions = _sessions_on_each_replica(ray_server.url, 2)
    plain = [pool.submit(_post, ray_server.url, 80, topic, session) for topic, session in enumerate(sessions)]
    streamed = [pool.submit(_stream_events, ray_server.url, 80, topic) for topic in range(4)]
    time.sleep(1.5)
    victim = ray_server.replica_processes()[0]
    victim.send_signal(signal.SIGKILL)
    for future in plain:  # nothing of a plain answer was sent yet: retried elsewhere
        assert future.result().status_code == 200, future.result().text
    for future in streamed:
        _check_stream(future.result())
    later = list(pool.map(lambda topic: _post(ray_server.url, 8, topic), range(10)))
    pool.shutdown()
    assert [a.status_code for a in later] == [200] * 10, [a.text for a in later if a.status_code != 200]
    # The plain requests the dead replica held (and any routed to it before Serve noticed) were sent again.
    assert _metric_sum(ray_server.url, "gemmakit_ingress_retries_total") > retries_before
    deadline = time.time() + 120  # Ray Serve replaces the dead replica
    while httpx.get(ray_server.url + "/health").json()["replicas"] < 2 or len(ray_server.replica_processes()) < 2:
        assert time.time() < deadline, "the killed replica was not replaced"
        time.sleep(1)
    assert victim.pid not in {p.pid for p in ray_server.replica_processes()}


def test_stopping_the_ingress_leaves_no_ray_process(ray_server):
    ray_processes = ray_server.descendants()
    assert any("raylet" in " ".join(_cmdline(p)) for p in ray_processes)
    ray_server.proc.send_signal(signal.SIGTERM)
    assert ray_server.proc.wait(timeout=120) == 0, ray_server.output()
    deadline = time.time() + 30
    while alive := [p for p in ray_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        assert time.time() < deadline, [(p.pid, _cmdline(p)) for p in alive]
        time.sleep(0.5)


def test_ray_flags_are_checked_before_anything_starts():
    for flags, message in ((["--min-replicas", "2"], "go together"),
                           (["--min-replicas", "3", "--max-replicas", "2"], "min <= max"),
                           (["--data-dir", "/proc/no/data"], "cannot use the data directory"),
                           (["--audit-db", "/proc/no/audit.db"], "cannot open the audit log")):
        proc = subprocess.run([sys.executable, "-m", "gemmakit", "serve", "--ray", "--port", str(free_port()),
                               *flags], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    without_ray = subprocess.run([sys.executable, "-m", "gemmakit", "serve", "--replicas", "2", "--port",
                                  str(free_port())], capture_output=True, text=True, timeout=120)
    assert without_ray.returncode == 2 and "--replicas: only with --ray" in without_ray.stderr, without_ray.stderr
