"""Batch jobs with ``--ray``: the ingress keeps the files and batch records (``--data-dir`` on its machine) and runs
the batch worker; each request of a batch goes to the replicas like any other request, at the "flex" service tier
(a replica's engine admits its interactive requests first).

The worker is the single server's own (:class:`gemmakit.batch.worker.BatchWorker`): it sends through the ingress's
app, so a batch request is routed, relayed, retried and refused exactly as a client's would be. What it reads of
an engine (its rows, its running and waiting requests) it reads here from all the replicas together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..batch.store import BatchStore
from ..batch.worker import BatchWorker
from .registry import reachable_replica_stats

BATCH_PATHS = ("/v1/files", "/v1/batches")  # the routes (and those below them) the ingress serves itself


class ClusterLoad:
    """The replicas' engines seen as one, from their routing stats (at most ``ROUTING_STATS_PERIOD_S`` old): the
    batch worker sends a request only while none waits and rows stay free for interactive requests."""

    def __init__(self, rows_per_replica: int) -> None:
        self.rows_per_replica = rows_per_replica

    def _stats(self) -> list[dict]:
        return list(reachable_replica_stats().values())

    @property
    def max_batch(self) -> int:
        return sum(s.get("max_batch", self.rows_per_replica) for s in self._stats()) or self.rows_per_replica

    @property
    def running(self) -> int:
        return sum(s.get("running", 0) for s in self._stats())

    @property
    def waiting(self) -> int:
        return sum(s.get("waiting", 0) for s in self._stats())


@dataclass
class IngressBatches:
    """What the Files and Batches routes (:mod:`gemmakit.server.routes.batches`) read from ``app.state.gemmakit``."""

    batches: BatchStore
    batch_worker: BatchWorker


def add_batches(api, ingress, data_dir: str | Path, key: bytes | None, rows_per_replica: int) -> IngressBatches:
    """Serve ``/v1/files`` and ``/v1/batches`` from ``api`` (the ingress's FastAPI app) with a store in
    ``data_dir``; the worker (started by the ingress's lifespan) sends through ``ingress`` (the whole ingress
    app), with ``key`` when the ingress needs one."""
    from ..server.routes import batches

    store = BatchStore(data_dir)
    state = IngressBatches(store, BatchWorker(ingress, store, ClusterLoad(rows_per_replica), key))
    api.state.gemmakit = state
    api.include_router(batches.router)
    return state
