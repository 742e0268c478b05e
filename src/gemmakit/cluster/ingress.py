"""The ingress: one OpenAI-compatible endpoint in front of gemmakit replicas on Ray Serve.

Every API route of ``gemmakit serve`` is answered by a replica's own copy of that server's app, on the replica's
own port: the ingress checks keys and sizes first with the same middleware, picks the replica
(:func:`~gemmakit.cluster.router.pick_replica`: conversation affinity, else the least busy), relays the request
over HTTP (:mod:`gemmakit.cluster.proxy`, from the plain ASGI path of :mod:`gemmakit.cluster.relay`; streams as
they come). The replicas and their URLs come from the deployment handle's router, which
Serve keeps up to date. The ingress owns what only a view over all replicas can answer:

- ``/health``: ``{"status", "replicas"}``, the live replicas it can reach; 503 while there are none.
- ``/metrics``: its own counters plus every replica's metrics (read from the replicas when scraped), each sample
  labelled ``replica``.
- faults: a request whose replica fails before anything reached the client (a whole plain response, or the first
  chunk of a stream) is retried on another replica; a stream cut later ends with an error event and ``[DONE]``;
  while no replica is live (all died, Serve is starting new ones) requests get a 503 with ``Retry-After``.
- batch jobs (with ``data_dir``): ``/v1/files`` and ``/v1/batches`` are kept here (:mod:`gemmakit.cluster.batches`).
- backpressure: a replica that answers 429 (its queue is full) or 503 (it is shutting down) is skipped for the
  next one; when every live replica said so, its answer (with ``Retry-After``) goes to the client.

Each response names its replica in the ``x-gemmakit-replica`` header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..server.auth import AuthGate
from ..server.errors import CatchAll, install_error_handlers
from ..server.limits import ServerLimits, SizeGate
from ..server.observability import RequestLog
from .batches import BATCH_PATHS, IngressBatches, add_batches
from .metrics import IngressMetrics, merged_metrics, scrape_replicas
from .proxy import replica_client
from .registry import reachable_replicas
from .relay import IngressState, forward
from .router import DEFAULT_IMBALANCE

logger = logging.getLogger("gemmakit.cluster")


async def health(request: Request) -> Response:
    replicas = len(reachable_replicas())
    state: IngressState = request.app.state.ingress
    body = {"status": "ok" if replicas else "unavailable", "replicas": replicas, "auth": bool(state.keys)}
    return Response(json.dumps(body), status_code=200 if replicas else 503, media_type="application/json")


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    state: IngressState = request.app.state.ingress
    texts = await scrape_replicas(state.client, reachable_replicas(), state.keys[0] if state.keys else None)
    return Response(merged_metrics(state.metrics, texts), media_type=CONTENT_TYPE_LATEST)


async def wait_for_replicas(handle, replicas: int, timeout: float = 120.0) -> str:
    """Ping until this process's router sees ``replicas`` replicas and knows their URLs (so /health is right from
    the first request); return the model id they serve."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await handle.ping.remote()
        seen = len(reachable_replicas())
        if seen >= replicas:
            return answer["model"]
        if time.monotonic() > deadline:
            logger.warning("the router sees %d of %d replicas after %.0f s", seen, replicas, timeout)
            return answer["model"]
        await asyncio.sleep(0.2)


@dataclass(frozen=True)
class IngressOptions:
    """What the ingress checks and keeps, besides the replicas it fronts."""

    api_keys: tuple[str, ...] = ()
    limits: ServerLimits = field(default_factory=ServerLimits)
    public_docs_and_metrics: bool = False
    replicas: int = 1  # how many replicas it waits for before it answers
    data_dir: str | None = None  # files and batch jobs (as ``gemmakit serve --data-dir``), kept by the ingress
    rows_per_replica: int = 8  # --max-batch: what the batch worker assumes of a replica it has no stats of yet
    imbalance: int = DEFAULT_IMBALANCE  # see gemmakit.cluster.router.pick_replica


def _lifespan(replicas: int, on_ready: Callable[[str], None] | None,
              on_stop: Callable[[], Awaitable[None]] | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state: IngressState = app.state.ingress
        batches: IngressBatches | None = getattr(app.state, "gemmakit", None)
        model_id = await wait_for_replicas(state.handle, replicas)
        state.client = replica_client()
        if batches is not None:
            batches.batch_worker.start()
        if on_ready is not None:
            on_ready(model_id)
        yield
        try:
            if batches is not None:
                await batches.batch_worker.stop()
            # The handle's router lives on this loop: whatever stops Serve must run before the loop closes.
            if on_stop is not None:
                await on_stop()
            else:
                await state.handle.shutdown_async()
        finally:
            await state.client.close()
            if batches is not None:
                batches.batches.close()

    return lifespan


class RelayedRoute:
    """What a relayed request's metrics are labelled with (see :func:`gemmakit.server.observability.route_label`):
    one label for every path, since a client chooses the path."""

    path = "/{path:path}"


def gates(state: IngressState, options: IngressOptions) -> list[tuple[type, dict]]:
    """The server's gates, innermost first: errors in OpenAI's shape, sizes, keys, the request log. Both the
    relay and the ingress's own routes stand behind them."""
    return [(CatchAll, {}), (SizeGate, {"limits": options.limits}),
            (AuthGate, {"keys": state.keys, "public_docs_and_metrics": options.public_docs_and_metrics}),
            (RequestLog, {"metrics": state.metrics})]


def gated(app, state: IngressState, options: IngressOptions):
    """``app`` behind :func:`gates`."""
    for gate, kwargs in gates(state, options):
        app = gate(app, **kwargs)
    return app


class IngressApp:
    """The ingress's ASGI app: a request under one of ``own_paths`` (health, metrics, files and batch jobs) goes to
    the ingress's FastAPI app ``api``; any other goes, as plain ASGI, to a replica (see
    :mod:`gemmakit.cluster.relay`), behind the same gates."""

    def __init__(self, api: FastAPI, own_paths: tuple[str, ...], state: IngressState,
                 options: IngressOptions) -> None:
        self.api, self.own_paths, self.state = api, own_paths, state
        self._relay = gated(self._forward, state, options)

    def _owns(self, path: str) -> bool:
        return any(path == own or path.startswith(own + "/") for own in self.own_paths)

    async def _forward(self, scope, receive, send) -> None:
        await forward(self.state, scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not self._owns(scope["path"]):
            scope["route"] = RelayedRoute
            await self._relay(scope, receive, send)
            return
        await self.api(scope, receive, send)  # the lifespan too: it starts and stops what the ingress needs


def create_ingress_app(handle, options: IngressOptions = IngressOptions(),
                       on_ready: Callable[[str], None] | None = None,
                       on_stop: Callable[[], Awaitable[None]] | None = None) -> IngressApp:
    """The ingress ASGI app over the replicas behind ``handle`` (a DeploymentHandle of GemmakitReplica). It
    starts answering once its router knows ``options.replicas`` replicas' URLs; then ``on_ready`` gets the served
    model's id. ``on_stop`` runs when the app stops, on its event loop (default: the handle is shut down)."""
    keys = [k.encode() for k in options.api_keys if k]
    state = IngressState(handle=handle, metrics=IngressMetrics(), keys=keys, imbalance=options.imbalance)
    # The replicas' apps serve /docs and /openapi.json (they describe the API); the ingress has none of its own.
    api = FastAPI(title="gemmakit (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=_lifespan(options.replicas, on_ready, on_stop))
    api.state.ingress = state
    install_error_handlers(api)
    for gate, kwargs in gates(state, options):  # each added goes outside the ones before, as in gated()
        api.add_middleware(gate, **kwargs)
    api.add_api_route("/health", health, methods=["GET"])
    api.add_api_route("/metrics", metrics, methods=["GET"])
    own_paths = ("/health", "/metrics") + (BATCH_PATHS if options.data_dir is not None else ())
    app = IngressApp(api, own_paths, state, options)
    if options.data_dir is not None:  # the batch worker sends through the whole ingress, as a client would
        add_batches(api, app, options.data_dir, keys[0] if keys else None, options.rows_per_replica)
    return app
