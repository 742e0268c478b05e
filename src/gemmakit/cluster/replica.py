"""A Ray Serve replica: one gemmakit engine behind the same FastAPI app as ``gemmakit serve``.

Each replica loads the model once (from the path or catalog name in its :class:`ReplicaSpec`, resolved on the
node it runs on), builds the app with :func:`gemmakit.server.create_app` and runs forwarded requests through it
(:func:`gemmakit.cluster.asgi.run_request`). So a request answered through Ray is answered by exactly the code
that answers it on one machine: validation, chat templates, continuous batching, errors, 429s, auth.

The replica reports its Prometheus metrics to the routers as Ray Serve routing stats (``record_routing_stats``,
pulled by Serve's controller every ``request_routing_stats_period_s``): the ingress's ``/metrics`` reads them
there, with no request to each replica.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from .asgi import ForwardedRequest, Opening, respond_in_items

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaSpec:
    """How each replica loads and serves its model (picklable: Ray ships it to every replica)."""

    model: str | None  # a GGUF path, an HF folder or a catalog name (None: the bundled model); on every node
    threads: int  # compute threads of the replica's engine (its share of the node's cores)
    load_options: dict[str, Any] = field(default_factory=dict)  # gemmakit.load's other arguments
    app_options: dict[str, Any] = field(default_factory=dict)  # gemmakit.server.create_app's arguments


class GemmakitReplica:
    """The deployment class (see :func:`gemmakit.cluster.launch.deployment`)."""

    def __init__(self, spec: ReplicaSpec) -> None:
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
        logger.info("replica %s serves %s with %d threads", self.replica_id, llm.path, spec.threads)

    async def forward(self, request: ForwardedRequest, affinity: str | None = None,
                      avoid: tuple[str, ...] = ()) -> AsyncIterator[Opening | bytes]:
        """The response: an Opening (this replica's id, the head, the first body bytes), then body chunks.
        ``affinity`` and ``avoid`` are read by the router (gemmakit.cluster.router), not here."""
        async for item in respond_in_items(self.app, request, self.replica_id):
            yield item

    async def ping(self) -> dict[str, str]:
        return {"replica": self.replica_id, "model": self.app.state.model_id}

    def record_routing_stats(self) -> dict[str, Any]:
        """What the routers (and through them the ingress's /metrics) know of this replica."""
        from prometheus_client import generate_latest

        return {"metrics": generate_latest(self.app.state.gemmakit.metrics.registry).decode(),
                "running": self.engine.running, "waiting": self.engine.waiting}

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine stopped is replaced."""
        if not self.engine.alive:
            raise RuntimeError(f"replica {self.replica_id}: the engine thread is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
