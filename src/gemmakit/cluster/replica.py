"""A Ray Serve replica: one gemmakit engine behind the same FastAPI app as ``gemmakit serve``, on its own port.

Each replica loads the model once (from the path or catalog name in its :class:`ReplicaSpec`, resolved on the
node it runs on), builds the app with :func:`gemmakit.server.create_app` and serves it with uvicorn on a port of
its node, as ``gemmakit serve`` does. So a request answered through Ray is answered by exactly the code that
answers it on one machine: validation, chat templates, continuous batching, errors, 429s, auth (the replica checks
the same keys as the ingress).

Ray Serve places, health-checks, replaces and autoscales the replicas; the request bytes go straight from the
ingress to the replica's port over HTTP, as in Serve's own direct-ingress mode. Carrying each streamed token as a
Ray item cost milliseconds of CPU per token on the cores the engine needs (and ~10 ms more to the first token on
a 2-core machine). So Serve does not see the requests: what it needs of them, the replica tells it.

- Load, for the autoscaler: ``record_autoscaling_stats`` reports the requests in the engine (running and
  waiting), which :func:`gemmakit.cluster.autoscale.in_flight_policy` turns into a number of replicas.
- Draining, when Serve removes a replica: its destructor stops the HTTP server gracefully (no new connections;
  the requests in flight finish, within the deployment's ``graceful_shutdown_timeout_s``) before the engine
  stops. The ingress meanwhile sends new requests elsewhere (Serve has dropped the replica from the routers, and a
  refused connection is retried on another replica).

The replica reports its URL and its load to the routers as Ray Serve routing stats (``record_routing_stats``,
pulled every ``request_routing_stats_period_s``): the ingress reads them there, and reads the replica's metrics
from its port when ``/metrics`` is scraped.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

HTTP_START_TIMEOUT_S = 60.0
IN_FLIGHT_METRIC = "in_flight"  # the autoscaling stat: requests running or waiting in the replica's engine
DRAIN_MARGIN_S = 2.0  # of the deployment's graceful shutdown time: Serve's own drain loop, the engine's stop
SHUTDOWN_TIMEOUT_S = 30.0  # the deployment's graceful shutdown time unless told (--shutdown-timeout)


def drain_timeout_for(shutdown_timeout: float) -> float:
    """Seconds a replica that Serve removes gives its HTTP requests to finish, of the deployment's graceful
    shutdown time ``shutdown_timeout`` (the rest: Serve's own drain loop, the engine's stop)."""
    return max(1.0, shutdown_timeout - DRAIN_MARGIN_S)


class ReplicaHTTPServer:
    """The replica's app under uvicorn, in a thread of its own, on ``host`` and a port the OS picks; stopped, it
    lets the requests in flight finish for up to ``drain_timeout`` seconds."""

    def __init__(self, app, host: str, drain_timeout: float) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        port = self.sock.getsockname()[1]
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        # Idle connections stay open longer than the ingress's pool keeps them (aiohttp: 15 s), so the replica never
        # closes one that the ingress is about to reuse.
        config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=75,
                                timeout_graceful_shutdown=max(1, int(drain_timeout)))
        self.drain_timeout = drain_timeout
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="gemmakit-replica-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + HTTP_START_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the replica's HTTP server did not start on {self.url}")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        """Stop serving: no new connections, idle ones closed, the requests in flight finished (or cut after the
        drain timeout); the app's lifespan then stops the engine and closes its files."""
        self.server.should_exit = True
        self.thread.join(self.drain_timeout + 5.0)


@dataclass(frozen=True)
class ReplicaSpec:
    """How each replica loads and serves its model (picklable: Ray ships it to every replica)."""

    model: str | None  # a GGUF path, an HF folder or a catalog name (None: the bundled model); on every node
    threads: int  # compute threads of the replica's engine (its share of the node's cores)
    load_options: dict[str, Any] = field(default_factory=dict)  # gemmakit.load's other arguments
    app_options: dict[str, Any] = field(default_factory=dict)  # gemmakit.server.create_app's arguments
    # The address the replica's port listens on: None, its node's address (reachable by an ingress on another
    # node); "127.0.0.1" when Ray is a local instance and every replica runs beside the ingress.
    listen_host: str | None = None
    # Seconds a replica that Serve removes gives its requests to finish (see drain_timeout_for).
    drain_timeout: float = drain_timeout_for(SHUTDOWN_TIMEOUT_S)


class GemmakitReplica:
    """The deployment class (see :func:`gemmakit.cluster.launch.deployment`)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        import ray
        from ray import serve

        from .. import load
        from ..catalog import resolve_model
        from ..server import create_app

        # As in gemmakit serve: the engine thread should not wait 5 ms for the GIL after each kernel call.
        sys.setswitchinterval(0.001)
        self.replica_id: str = serve.get_replica_context().replica_id.unique_id
        llm = load(resolve_model(spec.model), threads=spec.threads, **spec.load_options)
        self.app = create_app(llm, **spec.app_options)
        self.engine = self.app.state.engine
        self.http = ReplicaHTTPServer(self.app, spec.listen_host or ray.util.get_node_ip_address(),
                                      spec.drain_timeout)
        logger.info("replica %s serves %s with %d threads at %s", self.replica_id, llm.path, spec.threads,
                    self.http.url)

    async def ping(self) -> dict[str, str]:
        return {"replica": self.replica_id, "model": self.app.state.model_id}

    def record_routing_stats(self) -> dict[str, Any]:
        """What the routers (and through them the ingress) know of this replica: where it listens, its load."""
        return {"url": self.http.url, "running": self.engine.running, "waiting": self.engine.waiting,
                "max_batch": self.engine.max_batch}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaler's view of this replica's load (see gemmakit.cluster.autoscale): requests running or
        waiting in its engine. Serve itself sees none of them (they come over HTTP, not as Serve calls)."""
        return {IN_FLIGHT_METRIC: float(self.engine.running + self.engine.waiting)}

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine or HTTP server stopped is replaced."""
        if not self.engine.alive:
            raise RuntimeError(f"replica {self.replica_id}: the engine thread is not running")
        if not self.http.alive:
            raise RuntimeError(f"replica {self.replica_id}: its HTTP server stopped")

    def __del__(self) -> None:
        """Serve removes this replica (downscaling, or the application stops): drain the HTTP server (blocking
        Serve's call, which is what holds the replica up meanwhile), then stop the engine."""
        http = getattr(self, "http", None)
        if http is not None:
            http.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
