"""A Ray Serve replica: one gemmakit engine behind the same FastAPI app as ``gemmakit serve``, on its own port.

Each replica loads the model once (from the path or catalog name in its :class:`ReplicaSpec`, resolved on the
node it runs on), builds the app with :func:`gemmakit.server.create_app` and serves it with uvicorn on a port of
its node, as ``gemmakit serve`` does. So a request answered through Ray is answered by exactly the code that
answers it on one machine: validation, chat templates, continuous batching, errors, 429s, auth (the replica checks
the same keys as the ingress).

Ray Serve places, health-checks, replaces and autoscales the replicas; the request bytes go straight from the
ingress to the replica's port over HTTP, as in Serve's own direct-ingress mode. Carrying each streamed token as a
Ray item cost milliseconds of CPU per token on the cores the engine needs (and ~10 ms more to the first token on
a 2-core machine). When Serve autoscales the replicas, the ingress holds a lease on the replica while it relays a
request (:meth:`GemmakitReplica.hold`, a Serve call that lasts as long as the request), so that Serve's count of
ongoing requests, which drives its autoscaling and the draining of a replica it removes, stays right.

The replica reports its URL and its Prometheus metrics to the routers as Ray Serve routing stats
(``record_routing_stats``, pulled every ``request_routing_stats_period_s``): the ingress reads them there.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

HTTP_START_TIMEOUT_S = 60.0
LEASE_HEADER = b"x-gemmakit-lease"  # names the lease the ingress holds for a relayed request (see hold)
ENDED_KEPT_S = 300.0  # how long an ended request's lease id is remembered, for a lease call that comes later


class LeaseBook:
    """The relayed requests that ended on this replica's port, by lease id: a lease call (on Serve's event loop)
    returns when its request ends (on the HTTP server's thread), whichever of the two comes first. So a lease
    cannot outlive its request, even if the ingress's cancel of the Serve call is lost in a race."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ended: dict[str, float] = {}  # lease id -> when its request ended (no lease call waited yet)
        self._waiting: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}

    def end(self, lease: str) -> None:
        """The request relayed under ``lease`` ended (any thread)."""
        with self._lock:
            waiter = self._waiting.pop(lease, None)
            if waiter is None:
                now = time.monotonic()
                self._ended[lease] = now
                # Oldest first (a dict keeps insertion order): forgetting stops at the first id still kept.
                while now - self._ended[oldest := next(iter(self._ended))] > ENDED_KEPT_S:
                    del self._ended[oldest]
        if waiter is not None:
            loop, event = waiter
            loop.call_soon_threadsafe(event.set)

    async def wait(self, lease: str) -> None:
        """Until the request relayed under ``lease`` ends (at once if it has)."""
        event = asyncio.Event()
        with self._lock:
            if self._ended.pop(lease, None) is not None:
                return
            self._waiting[lease] = (asyncio.get_running_loop(), event)
        try:
            await event.wait()
        finally:
            with self._lock:
                self._waiting.pop(lease, None)


def tracking_leases(app, book: LeaseBook):
    """``app`` as an ASGI app that tells ``book`` when each request with a lease header ends."""
    async def tracked(scope, receive, send) -> None:
        lease = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == LEASE_HEADER), None)
        try:
            await app(scope, receive, send)
        finally:
            if lease is not None:
                book.end(lease)

    return tracked


class ReplicaHTTPServer:
    """The replica's app under uvicorn, in a thread of its own, on ``host`` and a port the OS picks."""

    def __init__(self, app, host: str) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        port = self.sock.getsockname()[1]
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        # Idle connections stay open longer than the ingress's pool keeps them (aiohttp: 15 s), so the replica never
        # closes one that the ingress is about to reuse.
        config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=75, timeout_graceful_shutdown=5)
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

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving; the app's lifespan then stops the engine and closes its files."""
        self.server.should_exit = True
        self.thread.join(timeout)


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
        self.leases, self.lease_book = self._lease_gauge(), LeaseBook()
        self.http = ReplicaHTTPServer(tracking_leases(self.app, self.lease_book),
                                      spec.listen_host or ray.util.get_node_ip_address())
        logger.info("replica %s serves %s with %d threads at %s", self.replica_id, llm.path, spec.threads,
                    self.http.url)

    def _lease_gauge(self):
        from prometheus_client import Gauge

        return Gauge("gemmakit_ray_leases", "requests relayed to this replica that Ray Serve counts as ongoing "
                     "(leases the ingress holds)", registry=self.app.state.gemmakit.metrics.registry)

    async def hold(self, pin: str, lease: str) -> None:
        """A lease: lasts until the request the ingress relays under ``lease`` to this replica's port ends (or the
        ingress cancels it). ``pin`` (this replica's id) is read by the router (gemmakit.cluster.router)."""
        self.leases.inc()
        try:
            await self.lease_book.wait(lease)
        finally:
            self.leases.dec()

    async def ping(self) -> dict[str, str]:
        return {"replica": self.replica_id, "model": self.app.state.model_id}

    def record_routing_stats(self) -> dict[str, Any]:
        """What the routers (and through them the ingress) know of this replica: where it listens, its load, its
        metrics."""
        from prometheus_client import generate_latest

        return {"url": self.http.url, "metrics": generate_latest(self.app.state.gemmakit.metrics.registry).decode(),
                "running": self.engine.running, "waiting": self.engine.waiting, "max_batch": self.engine.max_batch}

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine or HTTP server stopped is replaced."""
        if not self.engine.alive:
            raise RuntimeError(f"replica {self.replica_id}: the engine thread is not running")
        if not self.http.alive:
            raise RuntimeError(f"replica {self.replica_id}: its HTTP server stopped")

    def __del__(self) -> None:
        http = getattr(self, "http", None)
        if http is not None:
            http.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
