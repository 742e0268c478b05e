"""The ingress: one OpenAI-compatible endpoint in front of gemmakit replicas on Ray Serve.

Every API route of ``gemmakit serve`` is answered by a replica's own copy of that server's app, reached through
a Ray Serve deployment handle (streams included); the ingress checks keys and sizes first with the same
middleware, picks nothing itself (the :class:`~gemmakit.cluster.router.AffinityRouter` does) and owns what only a
view over all replicas can answer:

- ``/health``: ``{"status", "replicas"}``, the live replicas; 503 while there are none.
- ``/metrics``: its own counters plus every replica's metrics, each sample labelled ``replica``.
- faults: a request whose replica fails before anything reached the client (a whole plain response, or the first
  chunk of a stream) is retried on another replica; a stream cut later ends with an error event and ``[DONE]``;
  no replica accepting a request within ``route_timeout`` is a 503.
- backpressure: a replica that answers 429 (its queue is full) or 503 (it is shutting down) is skipped for the
  next one; when every live replica said so, its answer (with ``Retry-After``) goes to the client.

Each response names its replica in the ``x-gemmakit-replica`` header.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..server.auth import AuthGate
from ..server.errors import CatchAll, error_response, install_error_handlers
from ..server.limits import ServerLimits, SizeGate
from ..server.observability import RequestLog
from ..server.sse import ClosingStreamingResponse, sse
from .asgi import ForwardedRequest, ResponseHead, forwardable_headers
from .metrics import IngressMetrics, merged_metrics
from .registry import live_replica_stats

logger = logging.getLogger("gemmakit.cluster")

DEFAULT_ROUTE_TIMEOUT = 30.0  # seconds a request may wait for any replica to accept it
SKIP_STATUSES = frozenset({429, 503})  # a full or draining replica: try another before answering this
AFFINITY_CHARS = 2048  # characters of a conversation's opening (or a prompt's start) that pick its replica
HTTP_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


class ReplicaLost(Exception):
    """The replica handling a request failed (died, unreachable) before the client saw anything."""

    def __init__(self, replica: str | None, cause: BaseException) -> None:
        super().__init__(f"replica {replica or '(unknown)'} failed: {cause!r}")
        self.replica = replica


class NoReplica(Exception):
    """No replica accepted the request within the routing timeout."""


@dataclass
class IngressState:
    handle: Any  # ray.serve.handle.DeploymentHandle of the GemmakitReplica deployment
    metrics: IngressMetrics
    keys: list[bytes]
    route_timeout: float = DEFAULT_ROUTE_TIMEOUT


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
    """Send ``request`` to a replica and read its answer up to what the client is first sent.

    Raises:
        ReplicaLost: the replica failed before that point (the request may be retried elsewhere).
        NoReplica: no replica accepted it within the routing timeout.
    """
    stream = state.handle.options(stream=True).forward.remote(request, affinity=key, avoid=tuple(avoid))
    replica = None
    try:
        replica = await asyncio.wait_for(stream.__anext__(), state.route_timeout)
        head = await stream.__anext__()
        if is_event_stream(head):
            first = await anext(stream, None)
            return Attempt(replica, head, [first] if first is not None else [], stream)
        return Attempt(replica, head, [chunk async for chunk in stream])
    except asyncio.TimeoutError:
        stream.cancel()
        raise NoReplica() from None
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


def _live_replicas() -> int:
    stats = live_replica_stats()
    return len(stats) if stats is not None else 0


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
    for _ in range(max(3, _live_replicas() + 2)):
        try:
            attempt = await try_once(state, forwarded, key, tried)
        except ReplicaLost as exc:
            state.metrics.failures.inc()
            state.metrics.retries.inc()
            logger.warning("%s; retrying on another replica", exc)
            tried += [exc.replica] if exc.replica else []
            continue
        except NoReplica:
            return error_response(503, f"no replica accepted the request within {state.route_timeout:.0f} s",
                                  "server_error", code="no_replica", headers={"Retry-After": "5"})
        if attempt.head.status in SKIP_STATUSES and len(set(tried) | {attempt.replica}) < _live_replicas():
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
    replicas = _live_replicas()
    state: IngressState = request.app.state.ingress
    body = {"status": "ok" if replicas else "unavailable", "replicas": replicas, "auth": bool(state.keys)}
    return Response(json.dumps(body), status_code=200 if replicas else 503, media_type="application/json")


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    state: IngressState = request.app.state.ingress
    stats = live_replica_stats() or {}
    return Response(merged_metrics(state.metrics, stats), media_type=CONTENT_TYPE_LATEST)


def create_ingress_app(handle, api_keys: list[str] | None = None, limits: ServerLimits | None = None,
                       public_docs_and_metrics: bool = False,
                       route_timeout: float = DEFAULT_ROUTE_TIMEOUT) -> FastAPI:
    """The ingress FastAPI app over the replicas behind ``handle`` (a DeploymentHandle of GemmakitReplica)."""
    state = IngressState(handle=handle, metrics=IngressMetrics(), keys=[k.encode() for k in (api_keys or []) if k],
                         route_timeout=route_timeout)
    # The replicas' apps serve /docs and /openapi.json (they describe the API); the ingress has none of its own.
    app = FastAPI(title="gemmakit (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None)
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
