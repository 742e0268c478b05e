"""gemmakit serve --ray --ray-address: replicas on a Ray cluster started beforehand with `ray start --head`, as on
several machines. The replicas listen on the node's address (not loopback), the ingress reaches them there, and
stopping gemmakit deletes its application only: the cluster stays up, without gemmakit's replicas.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'gemmakit[ray]'")
psutil = pytest.importorskip("psutil")

from serving import free_port  # noqa: E402
from test_ray_serve import RayServer, _cmdline, kill_all  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
LOCAL_INSTANCE_ADDRESS = """
from gemmakit.cluster.launch import start_ray  # first: gemmakit.cluster sets Ray's token mode before ray loads
import ray
assert start_ray(None)
print(ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


class RayHead:
    """`ray start --head --block`: a cluster's head node, which stops with its processes when terminated."""

    def __init__(self) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")
        self.proc = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={self.address.split(':')[1]}",
                                      "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    def wait_up(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while "Ray runtime started" not in self.output():
            assert self.proc.poll() is None, self.output()
            assert time.time() < deadline, "ray start --head did not come up:\n" + self.output()
            time.sleep(0.5)

    def processes(self, name: str) -> list[psutil.Process]:
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p for p in procs if name in " ".join(_cmdline(p)) and p.status() != psutil.STATUS_ZOMBIE]

    def stop(self) -> None:
        procs = self.processes("")
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        kill_all(procs)  # what `ray start` did not stop itself


def _replica_listen_addresses(head: RayHead) -> set[str]:
    """The addresses the replicas' uvicorn servers listen on (the only sockets with uvicorn's backlog of 2048)."""
    addresses = set()
    for p in head.processes("ServeReplica"):
        for conn in p.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN:
                addresses.add(conn.laddr.ip)
    return addresses


def test_serving_on_a_running_cluster_leaves_it_running():
    # `ray start` names its cluster in this file for later ray.init() calls, and leaves it behind when stopped.
    current_cluster = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    had_current_cluster = current_cluster.exists()
    head = RayHead()
    server = None
    try:
        head.wait_up()
        # Without --ray-address, gemmakit starts its own instance even beside a cluster `ray start` made.
        local = subprocess.run([sys.executable, "-c", LOCAL_INSTANCE_ADDRESS], capture_output=True, text=True,
                               timeout=300)
        assert local.returncode == 0, local.stderr[-3000:]
        assert local.stdout.split()[-1] not in (head.address, head.address.replace("127.0.0.1", "")), local.stdout
        server = RayServer(["--ray-address", head.address, "--replicas", "2", "--replica-cpus", "1"])
        server.wait_up(replicas=2)
        replicas = set()
        for topic in range(6):
            r = httpx.post(server.url + "/v1/completions", timeout=120, headers={"x-session-id": f"s{topic}"},
                           json={"model": "m", "prompt": f"Note {topic}:", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
            replicas.add(r.headers["x-gemmakit-replica"])
        assert len(replicas) == 2, replicas
        # On a cluster the replicas are reached at their node's address: each one's port is not on loopback.
        assert len(head.processes("ServeReplica")) == 2
        assert "127.0.0.1" not in _replica_listen_addresses(head)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=120) == 0, server.output()
        deadline = time.time() + 60
        while head.processes("ServeReplica"):
            assert time.time() < deadline, "gemmakit's replicas outlived its application"
            time.sleep(0.5)
        assert head.proc.poll() is None and head.processes("raylet"), "the cluster went down with gemmakit"
        # ray start --head turned on token authentication (Ray 2.60); its clients must be told to send the token.
        check = subprocess.run([RAY, "status", f"--address={head.address}"], capture_output=True, text=True,
                               timeout=120, env={**os.environ, "RAY_AUTH_MODE": "token"})
        assert check.returncode == 0 and "CPU" in check.stdout, check.stdout + check.stderr
    finally:
        if server is not None and server.proc.poll() is None:
            server.kill()
        head.stop()
        if not had_current_cluster:
            current_cluster.unlink(missing_ok=True)
