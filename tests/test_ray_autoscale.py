"""gemmakit serve --ray --min-replicas 1 --max-replicas 2: Serve's autoscaler adds a replica under load.

First, a stream holds a lease (a Serve call, which Serve's autoscaler counts) on its replica while it lasts.

One replica to start; clients keep more requests in flight than a replica has rows (the autoscaler's target)
until /health counts two replicas, and every request is answered meanwhile.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'gemmakit[ray]'")

from test_ray_serve import RayServer, check_a_stream_holds_a_lease_while_it_lasts  # noqa: E402

MAX_BATCH = 2  # the autoscaler aims at this many requests in flight per replica


def _keep_busy(url: str, stop: threading.Event, codes: list[int], topic: int) -> None:
    while not stop.is_set():
        r = httpx.post(url + "/v1/completions", timeout=300,
                       json={"model": "m", "prompt": f"Note {topic}:", "max_tokens": 48, "ignore_eos": True})
        codes.append(r.status_code)


def test_load_adds_a_replica():
    server = RayServer(["--min-replicas", "1", "--max-replicas", "2", "--replica-cpus", "1", "--max-batch",
                        str(MAX_BATCH), "--max-waiting", "32"])
    stop, codes = threading.Event(), []
    clients = [threading.Thread(target=_keep_busy, args=(server.url, stop, codes, i)) for i in range(8)]
    try:
        server.wait_up(replicas=1)
        check_a_stream_holds_a_lease_while_it_lasts(server.url, replicas=1)
        for c in clients:
            c.start()
        deadline = time.time() + 150
        while httpx.get(server.url + "/health").json()["replicas"] < 2:
            assert time.time() < deadline, "no second replica after 150 s of load:\n" + server.output()
            time.sleep(1)
        stop.set()
        for c in clients:
            c.join(timeout=120)
        assert codes and set(codes) == {200}, codes
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=120) == 0, server.output()
    finally:
        stop.set()
        if server.proc.poll() is None:
            server.kill()
