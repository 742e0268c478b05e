"""gemmakit serve --ray --min-replicas 1 --max-replicas 2: Serve's autoscaler adds a replica under load, and a
replica it removes finishes its streams first.

Requests reach the replicas over HTTP, so Serve counts none of them: the replicas report their load themselves
(gemmakit.cluster.autoscale). One replica to start; clients keep more requests in flight than a replica has rows
(the autoscaler's target) until /health counts two replicas, and every request is answered meanwhile. Then two long
streams run, one on each replica, and the load stops: the autoscaler wants one replica again and removes one of
the two while its stream runs. Both streams must end as they would have anyway, every token and [DONE], and new
requests meanwhile go to the replica that stays.
"""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'gemmakit[ray]'")

from test_ray_serve import RayServer  # noqa: E402

MAX_BATCH = 2  # the autoscaler aims at this many requests in flight per replica
STREAM_TOKENS = 2500  # long enough to outlast the load's trace in Serve's 15 s window, and the downscale delay


def _keep_busy(url: str, stop: threading.Event, codes: list[int], topic: int) -> None:
    while not stop.is_set():
        r = httpx.post(url + "/v1/completions", timeout=300,
                       json={"model": "m", "prompt": f"Note {topic}:", "max_tokens": 48, "ignore_eos": True})
        codes.append(r.status_code)


def _replicas(url: str) -> int:
    return httpx.get(url + "/health").json()["replicas"]


class LongStream:
    """A streamed completion of STREAM_TOKENS tokens, read to its end by a thread of its own."""

    def __init__(self, url: str, topic: int) -> None:
        body = {"model": "m", "prompt": f"Chronicle {topic}:", "max_tokens": STREAM_TOKENS, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        self.client = httpx.Client(timeout=300)
        self.response = self.client.send(self.client.build_request("POST", url + "/v1/completions", json=body),
                                         stream=True)
        self.replica = self.response.headers["x-gemmakit-replica"]
        self.events: list[dict] = []
        self.done = False
        self.failure: httpx.HTTPError | None = None  # the connection broke (or the test closed it: cancel)
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self) -> None:
        try:
            for line in self.response.iter_lines():
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    self.events.append(json.loads(line[6:]))
        except httpx.HTTPError as exc:
            self.failure = exc
        finally:
            self.response.close()
            self.client.close()

    @property
    def finished(self) -> bool:
        return not self.reader.is_alive()

    def cancel(self) -> None:
        self.response.close()  # the ingress then cancels the generation on its replica
        self.reader.join(timeout=30)


def _a_stream_on_each_replica(url: str) -> list[LongStream]:
    streams = [LongStream(url, 0)]
    for topic in range(1, 40):
        stream = LongStream(url, topic)
        if stream.replica != streams[0].replica:
            return streams + [stream]
        stream.cancel()  # the same replica
    raise AssertionError("40 streams all went to one replica")


def _check_whole(stream: LongStream) -> None:
    assert stream.done, (f"the stream on {stream.replica} ended without [DONE] ({stream.failure!r}): "
                         f"{stream.events[-2:]}")
    assert not [e for e in stream.events if "error" in e], stream.events[-2:]
    assert stream.events[-1]["usage"]["completion_tokens"] == STREAM_TOKENS
    assert stream.events[-2]["choices"][0]["finish_reason"] == "length"


def _short_request(url: str) -> str:
    r = httpx.post(url + "/v1/completions", timeout=60, json={"model": "m", "prompt": "Hi", "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.headers["x-gemmakit-replica"]


def _scale_up(server: RayServer) -> None:
    stop, codes = threading.Event(), []
    clients = [threading.Thread(target=_keep_busy, args=(server.url, stop, codes, i)) for i in range(8)]
    for c in clients:
        c.start()
    try:
        deadline = time.time() + 150
        while _replicas(server.url) < 2:
            assert time.time() < deadline, "no second replica after 150 s of load:\n" + server.output()
            time.sleep(1)
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=120)
    assert codes and set(codes) == {200}, codes


def test_load_adds_a_replica_and_a_removed_replica_finishes_its_streams():
    # Streams may take a minute to drain: a shutdown timeout to match (it bounds a removed replica's drain).
    server = RayServer(["--min-replicas", "1", "--max-replicas", "2", "--replica-cpus", "1", "--max-batch",
                        str(MAX_BATCH), "--max-waiting", "32", "--downscale-delay", "1", "--shutdown-timeout", "240"])
    streams: list[LongStream] = []
    try:
        server.wait_up(replicas=1)
        _scale_up(server)
        streams = _a_stream_on_each_replica(server.url)
        deadline = time.time() + 120
        while _replicas(server.url) > 1:  # 2 in flight, 2 per replica: one replica is enough now
            assert time.time() < deadline, "the autoscaler kept both replicas for 120 s:\n" + server.output()
            assert not any(s.finished for s in streams), "a stream ended before a replica was removed"
            time.sleep(0.5)
        # While the removed replica drains its stream, new requests go to the one left.
        served_by = {_short_request(server.url) for _ in range(4)}
        assert len(served_by) == 1 and served_by <= {s.replica for s in streams}, served_by
        assert not any(s.finished for s in streams), "the streams ended before the replica drained them"
        for stream in streams:
            stream.reader.join(timeout=240)
            _check_whole(stream)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=120) == 0, server.output()
    finally:
        for stream in streams:
            stream.cancel()
        if server.proc.poll() is None:
            server.kill()
