"""The ingress: one OpenAI-compatible endpoint in front of gemmakit replicas on Ray Serve.

Every API route of ``gemmakit serve`` is answered by a replica's own copy of that server's app, reached through
a Ray Serve deployment handle (streams included); the ingress checks keys and sizes first with the same
middleware, picks nothing itself (the :class:`~gemmakit.cluster.router.AffinityRouter` does) and owns what only a
view over all replicas can answer:

- ``/health``: ``{"status", "replicas"}``, the live replicas; 503 while there are none.
- ``/metrics``: its own counters plus every replica's metrics, each sample labelled ``replica``.
- faults: a request whose replica fails before anything reached the client (a whole plain response, or the first
  chunk of a stream) is retried on another replica; a stream cut later ends with an error event and ``[DONE]``;
  while no replica is live (all died, Serve is starting new ones) requests get a 503 with ``Retry-After``.
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
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..server.auth import AuthGate
from ..server.errors import CatchAll, error_response, install_error_handlers
from ..server.limits import ServerLimits, SizeGate
from ..server.observability import RequestLog
from ..server.sse import ClosingStreamingResponse, sse
from .asgi import ForwardedRequest, Opening, ResponseHead, forwardable_headers
from .metrics import IngressMetrics, merged_metrics
from .registry import live_replica_count, live_replica_stats

logger = logging.getLogger("gemmakit.cluster")

SKIP_STATUSES = frozenset({429, 503})  # a full or draining replica: try another before answering this
AFFINITY_CHARS = 2048  # characters of a conversation's opening (or a prompt's start) that pick its replica
HTTP_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


class ReplicaLost(Exception):
    """The replica handling a request failed (died, unreachable) before the client saw anything."""

    def __init__(self, replica: str | None, cause: BaseException) -> None:
        super().__init__(f"replica {replica or '(unknown)'} failed: {cause!r}")
        self.replica = replica


@dataclass
class IngressState:
    handle: Any  # ray.serve.handle.DeploymentHandle of the GemmakitReplica deployment
    metrics: IngressMetrics
    keys: list[bytes]


@dataclass
class Attempt:
    """One try of a request on one replica, read up to the point where the client is answered."""

    replica: str
    head: ResponseHead
    chunks: list[bytes] = field(default_factory=list)  # the whole body, or a stream's first chunk
    rest: Any = None  # the rest of an event stream (a DeploymentResponseGenerator); None once complete


def ray_failures() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a replica failed, not the request."""
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError

    return (RayActorError, ActorUnavailableError, RayTaskError, BackPressureError)


def affinity_key(path: str, headers, body: bytes) -> str | None:
    """What keeps a conversation on one replica: an explicit session id header, else its opening (the messages up
    to the first user turn) or, for a completion, the prompt's first characters; None for other routes."""
    session = headers.get("x-session-id")
    if session:
        return "session:" + session[:256]
    if path not in ("/v1/chat/completions", "/v1/completions"):
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    messages = payload.get("messages")
    if isinstance(messages, list):
        first_user = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                          len(messages) - 1)
        return "chat:" + json.dumps(messages[:first_user + 1], sort_keys=True)[:AFFINITY_CHARS]
    prompt = payload.get("prompt")
    return "prompt:" + json.dumps(prompt)[:AFFINITY_CHARS] if prompt is not None else None


def is_event_stream(head: ResponseHead) -> bool:
    return (head.header(b"content-type") or b"").startswith(b"text/event-stream")


async def try_once(state: IngressState, request: ForwardedRequest, key: str | None, avoid: list[str]) -> Attempt:
    """Send ``request`` to a replica and read its answer up to what the client is first sent: a plain response
    whole, a stream's head and first chunk.

    Raises:
        ReplicaLost: the replica failed before that point (the request may be retried elsewhere).
    """
    stream = state.handle.options(stream=True).forward.remote(request, affinity=key, avoid=tuple(avoid))
    replica = None
    try:
        opening: Opening = await anext(stream)
        replica = opening.replica
        if opening.complete:
            return Attempt(replica, opening.head, [opening.body])
        if is_event_stream(opening.head):
            return Attempt(replica, opening.head, [opening.body], stream)
        return Attempt(replica, opening.head, [opening.body] + [chunk async for chunk in stream])
    except (StopAsyncIteration, *ray_failures()) as exc:
        stream.cancel()
        raise ReplicaLost(replica, exc) from exc


async def relay(attempt: Attempt, metrics: IngressMetrics) -> AsyncIterator[bytes]:
    """The rest of a stream, as it comes; if its replica fails now, an error event and [DONE], as the single
    server ends a stream its engine could not finish."""
    try:
        for chunk in attempt.chunks:
            yield chunk
        async for chunk in attempt.rest:
            yield chunk
    except ray_failures() as exc:
        metrics.failures.inc()
        logger.warning("replica %s failed during a stream: %r", attempt.replica, exc)
        yield sse({"error": {"message": f"the replica serving this stream failed ({type(exc).__name__}); the "
                             "answer is incomplete", "type": "server_error", "param": None,
                             "code": "replica_failed"}}).encode()
        yield b"data: [DONE]\n\n"
    finally:
        attempt.rest.cancel()


def respond(attempt: Attempt, metrics: IngressMetrics) -> Response:
    """The client's response: the replica's status and headers (and its id), its body whole or streamed."""
    headers = [(k, v) for k, v in attempt.head.headers if k.lower() not in (b"content-length", b"transfer-encoding")]
    headers.append((b"x-gemmakit-replica", attempt.replica.encode()))
    if attempt.rest is None:
        response = Response(b"".join(attempt.chunks), status_code=attempt.head.status)
    else:
        response = ClosingStreamingResponse(relay(attempt, metrics), status_code=attempt.head.status)
    response.raw_headers = [h for h in response.raw_headers if h[0] == b"content-length"] + headers
    return response


async def forward(request: Request) -> Response:
    """Every route but /health and /metrics: forwarded to a replica, retried on another while nothing reached the
    client, a full replica skipped for the next one."""
    state: IngressState = request.app.state.ingress
    body = await request.body()
    forwarded = ForwardedRequest(request.method, request.url.path, request.scope.get("query_string", b""),
                                 forwardable_headers(request.scope["headers"]), body, request.scope.get("client"))
    key = affinity_key(forwarded.path, request.headers, body)
    tried: list[str] = []
    skipped: Attempt | None = None
    lost = False  # the last try's replica failed: this one is a retry
    for _ in range(max(3, (live_replica_count() or 0) + 2)):
        live = live_replica_count()
        if live == 0:  # Serve would hold the request until a new replica is up
            return error_response(503, "no replica is running (they are being replaced): retry shortly",
                                  "server_error", code="no_replica", headers={"Retry-After": "5"})
        if lost:
            state.metrics.retries.inc()
        try:
            attempt = await try_once(state, forwarded, key, tried)
        except ReplicaLost as exc:
            state.metrics.failures.inc()
            logger.warning("%s; trying another replica", exc)
            tried += [exc.replica] if exc.replica else []
            lost = True
            continue
        lost = False
        if attempt.head.status in SKIP_STATUSES and len(set(tried) | {attempt.replica}) < (live or 0):
            skipped = attempt
            tried.append(attempt.replica)
            if attempt.rest is not None:
                attempt.rest.cancel()
            continue
        return respond(attempt, state.metrics)
    if skipped is not None:
        return respond(skipped, state.metrics)
    return error_response(503, "every replica tried failed this request; retry later", "server_error",
                          code="replicas_failed", headers={"Retry-After": "5"})


async def health(request: Request) -> Response:
    replicas = live_replica_count() or 0
    state: IngressState = request.app.state.ingress
    body = {"status": "ok" if replicas else "unavailable", "replicas": replicas, "auth": bool(state.keys)}
    return Response(json.dumps(body), status_code=200 if replicas else 503, media_type="application/json")


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    state: IngressState = request.app.state.ingress
    stats = live_replica_stats() or {}
    return Response(merged_metrics(state.metrics, stats), media_type=CONTENT_TYPE_LATEST)


async def wait_for_replicas(handle, replicas: int, timeout: float = 120.0) -> str:
    """Ping until this process's router sees ``replicas`` replicas (so /health is right from the first request);
    return the model id they serve."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await handle.ping.remote()
        seen = live_replica_count() or 0
        if seen >= replicas:
            return answer["model"]
        if time.monotonic() > deadline:
            logger.warning("the router sees %d of %d replicas after %.0f s", seen, replicas, timeout)
            return answer["model"]
        await asyncio.sleep(0.2)


def _lifespan(replicas: int, on_ready: Callable[[str], None] | None,
              on_stop: Callable[[], Awaitable[None]] | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        handle = app.state.ingress.handle
        model_id = await wait_for_replicas(handle, replicas)
        if on_ready is not None:
            on_ready(model_id)
        yield
        # The handle's router lives on this loop: whatever stops Serve must run before the loop closes.
        if on_stop is not None:
            await on_stop()
        else:
            await handle.shutdown_async()

    return lifespan


def create_ingress_app(handle, api_keys: list[str] | None = None, limits: ServerLimits | None = None,
                       public_docs_and_metrics: bool = False, replicas: int = 1,
                       on_ready: Callable[[str], None] | None = None,
                       on_stop: Callable[[], Awaitable[None]] | None = None) -> FastAPI:
    """The ingress FastAPI app over the replicas behind ``handle`` (a DeploymentHandle of GemmakitReplica). It
    starts answering once its router sees ``replicas`` replicas; then ``on_ready`` gets the served model's id.
    ``on_stop`` runs when the app stops, on its event loop (default: the handle is shut down)."""
    state = IngressState(handle=handle, metrics=IngressMetrics(), keys=[k.encode() for k in (api_keys or []) if k])
    # The replicas' apps serve /docs and /openapi.json (they describe the API); the ingress has none of its own.
    app = FastAPI(title="gemmakit (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=_lifespan(replicas, on_ready, on_stop))
    app.state.ingress = state
    install_error_handlers(app)
    app.add_middleware(CatchAll)
    app.add_middleware(SizeGate, limits=limits or ServerLimits())
    app.add_middleware(AuthGate, keys=state.keys, public_docs_and_metrics=public_docs_and_metrics)
    app.add_middleware(RequestLog, metrics=state.metrics)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/{path:path}", forward, methods=HTTP_METHODS)
    return app
