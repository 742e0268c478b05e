"""The ingress: one OpenAI-compatible endpoint in front of gemmakit replicas on Ray Serve.

Every API route of ``gemmakit serve`` is answered by a replica's own copy of that server's app, on the replica's
own port: the ingress checks keys and sizes first with the same middleware, picks the replica
(:func:`~gemmakit.cluster.router.pick_replica`: conversation affinity, else the least busy), relays the request
over HTTP (:mod:`gemmakit.cluster.proxy`; streams as they come) and holds a Serve lease on the replica meanwhile
(see :mod:`gemmakit.cluster.replica`). The replicas and their URLs come from the deployment handle's router, which
Serve keeps up to date. The ingress owns what only a view over all replicas can answer:

- ``/health``: ``{"status", "replicas"}``, the live replicas it can reach; 503 while there are none.
- ``/metrics``: its own counters plus every replica's metrics, each sample labelled ``replica``.
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
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response

from ..server.auth import AuthGate
from ..server.errors import CatchAll, error_response, install_error_handlers
from ..server.limits import ServerLimits, SizeGate
from ..server.observability import RequestLog
from ..server.sse import ClosingStreamingResponse, sse
from .batches import IngressBatches, add_batches
from .metrics import IngressMetrics, merged_metrics
from .proxy import ForwardedRequest, ReplicaResponse, forwardable_headers, replica_client, send
from .registry import live_replica_stats, reachable_replicas
from .replica import LEASE_HEADER
from .router import DEFAULT_IMBALANCE, pick_replica

logger = logging.getLogger("gemmakit.cluster")

SKIP_STATUSES = frozenset({429, 503})  # a full or draining replica: try another before answering this
LEASE_DELAY_S = 0.05  # see Lease
AFFINITY_CHARS = 2048  # characters of a conversation's opening (or a prompt's start) that pick its replica
HTTP_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


class ReplicaLost(Exception):
    """The replica handling a request failed (died, unreachable) before the client saw anything."""

    def __init__(self, replica: str | None, cause: BaseException) -> None:
        super().__init__(f"replica {replica or '(unknown)'} failed: {cause!r}")
        self.replica = replica


class NoReachableReplica(Exception):
    """No replica is live, or none has told the routers its URL yet."""


@dataclass
class IngressState:
    handle: Any  # ray.serve.handle.DeploymentHandle of the GemmakitReplica deployment
    metrics: IngressMetrics
    keys: list[bytes]
    imbalance: int = DEFAULT_IMBALANCE
    client: httpx.AsyncClient | None = None  # made on the ingress's event loop, in its lifespan
    in_flight: Counter = field(default_factory=Counter)  # replica id -> requests this ingress is relaying to it
    watchers: set = field(default_factory=set)  # the tasks that wait for leases to end (kept from the GC)


class Lease:
    """While the ingress relays a request to a replica: one more request in flight there (for picking), and, once
    the request has lasted ``LEASE_DELAY_S``, a Serve call held open on the replica (for Serve's own count, which
    drives autoscaling and graceful shutdown). Opening that call costs both processes milliseconds of CPU; made at
    once, it delayed the first token by ~6 ms on a 2-core machine, and a request shorter than the delay changes
    Serve's averaged count by nothing that matters."""

    def __init__(self, state: IngressState, replica: str) -> None:
        self.state, self.replica = state, replica
        self.id = uuid.uuid4().hex  # sent with the request (LEASE_HEADER): the replica ends the call with it
        self.call: Any = None
        self.ended = False
        state.in_flight[replica] += 1
        self.timer = asyncio.get_running_loop().call_later(LEASE_DELAY_S, self._open)

    def _open(self) -> None:
        try:
            self.call = self.state.handle.hold.remote(pin=self.replica, lease=self.id)
        except Exception as exc:  # Serve is stopping: the request goes on without its lease
            logger.warning("no lease on replica %s: %r", self.replica, exc)
            return
        watcher = asyncio.ensure_future(self._watch(self.call))
        self.state.watchers.add(watcher)
        watcher.add_done_callback(self.state.watchers.discard)

    @staticmethod
    async def _watch(call) -> None:
        try:
            await call
        except Exception:  # cancelled at the end (the usual way), or the replica died: nothing to do either way
            pass

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self.state.in_flight[self.replica] -= 1
        self.timer.cancel()
        if self.call is not None:
            self.call.cancel()


@dataclass
class Attempt:
    """One try of a request on one replica, read up to the point where the client is answered."""

    replica: str
    answer: ReplicaResponse
    lease: Lease

    async def release(self) -> None:
        try:
            await self.answer.close()
        finally:
            self.lease.end()


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


async def try_once(state: IngressState, request: ForwardedRequest, key: str | None, avoid: list[str]) -> Attempt:
    """Send ``request`` to a replica and read its answer up to what the client is first sent: a plain response
    whole, a stream's head and first chunk.

    Raises:
        NoReachableReplica: there is no replica to send it to.
        ReplicaLost: the replica failed before that point (the request may be retried elsewhere).
    """
    urls = reachable_replicas()
    replica = pick_replica({r: state.in_flight[r] for r in urls}, key, set(avoid), state.imbalance)
    if replica is None:
        raise NoReachableReplica()
    lease = Lease(state, replica)
    try:
        answer = await send(state.client, urls[replica], request.with_header(LEASE_HEADER, lease.id.encode()))
    except httpx.TransportError as exc:
        lease.end()
        raise ReplicaLost(replica, exc) from exc
    except BaseException:
        lease.end()
        raise
    return Attempt(replica, answer, lease)


async def whole_events(chunks: AsyncIterator[bytes], first: list[bytes]) -> AsyncIterator[bytes]:
    """An event stream's bytes cut at event boundaries (a blank line): what a read returned past the last one waits
    for the next read, so a stream cut short ends between two events, never inside one."""
    pending = b""

    async def reads() -> AsyncIterator[bytes]:
        for chunk in first:
            yield chunk
        async for chunk in chunks:
            yield chunk

    async for chunk in reads():
        pending += chunk
        end = pending.rfind(b"\n\n")
        if end >= 0:
            yield pending[:end + 2]
            pending = pending[end + 2:]
    if pending:  # the replica ended its stream without a blank line: pass the rest as it is
        yield pending


async def relay(attempt: Attempt, metrics: IngressMetrics) -> AsyncIterator[bytes]:
    """The rest of a stream, as it comes; if its replica fails now, an error event and [DONE], as the single
    server ends a stream its engine could not finish."""
    try:
        async for chunk in whole_events(attempt.answer.rest, attempt.answer.chunks):
            yield chunk
    except httpx.TransportError as exc:
        metrics.failures.inc()
        logger.warning("replica %s failed during a stream: %r", attempt.replica, exc)
        yield sse({"error": {"message": f"the replica serving this stream failed ({type(exc).__name__}); the "
                             "answer is incomplete", "type": "server_error", "param": None,
                             "code": "replica_failed"}}).encode()
        yield b"data: [DONE]\n\n"
    finally:
        await attempt.release()


class RelayedStream(ClosingStreamingResponse):
    """A relayed event stream whose attempt is released however the response ends, even before its body was
    read (an async generator that never started runs no ``finally``)."""

    def __init__(self, attempt: Attempt, metrics: IngressMetrics) -> None:
        super().__init__(relay(attempt, metrics), status_code=attempt.answer.head.status)
        self.attempt = attempt

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.attempt.release()


async def respond(attempt: Attempt, metrics: IngressMetrics) -> Response:
    """The client's response: the replica's status and headers (and its id), its body whole or streamed."""
    headers = attempt.answer.head.relayed_headers() + [(b"x-gemmakit-replica", attempt.replica.encode())]
    if attempt.answer.rest is None:
        await attempt.release()
        response = Response(b"".join(attempt.answer.chunks), status_code=attempt.answer.head.status)
    else:
        response = RelayedStream(attempt, metrics)
    response.raw_headers = [h for h in response.raw_headers if h[0] == b"content-length"] + headers
    return response


async def forward(request: Request) -> Response:
    """Every route but /health and /metrics: relayed to a replica, retried on another while nothing reached the
    client, a full replica skipped for the next one."""
    state: IngressState = request.app.state.ingress
    body = await request.body()
    forwarded = ForwardedRequest(request.method, request.url.path, request.scope.get("query_string", b""),
                                 forwardable_headers(request.scope["headers"]), body)
    key = affinity_key(forwarded.path, request.headers, body)
    tried: list[str] = []
    full: Attempt | None = None  # the last replica that answered 429 or 503: its answer if every one does
    lost = False  # the last try's replica failed: this one is a retry
    try:
        for _ in range(max(3, len(reachable_replicas()) + 2)):
            if lost:
                state.metrics.retries.inc()
            try:
                attempt = await try_once(state, forwarded, key, tried)
            except NoReachableReplica:  # Serve is starting new ones (or they have not reported their URL yet)
                return error_response(503, "no replica is running (they are being replaced): retry shortly",
                                      "server_error", code="no_replica", headers={"Retry-After": "5"})
            except ReplicaLost as exc:
                state.metrics.failures.inc()
                logger.warning("%s; trying another replica", exc)
                tried += [exc.replica] if exc.replica else []
                lost = True
                continue
            lost = False
            tried.append(attempt.replica)
            if full is not None:
                await full.release()
            full = attempt
            if attempt.answer.head.status not in SKIP_STATUSES or len(set(tried)) >= len(reachable_replicas()):
                break
        if full is None:
            return error_response(503, "every replica tried failed this request; retry later", "server_error",
                                  code="replicas_failed", headers={"Retry-After": "5"})
        answer, full = full, None
        return await respond(answer, state.metrics)
    finally:
        if full is not None:
            await full.release()


async def health(request: Request) -> Response:
    replicas = len(reachable_replicas())
    state: IngressState = request.app.state.ingress
    body = {"status": "ok" if replicas else "unavailable", "replicas": replicas, "auth": bool(state.keys)}
    return Response(json.dumps(body), status_code=200 if replicas else 503, media_type="application/json")


async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    state: IngressState = request.app.state.ingress
    stats = live_replica_stats() or {}
    return Response(merged_metrics(state.metrics, stats), media_type=CONTENT_TYPE_LATEST)


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
            await state.client.aclose()
            if batches is not None:
                batches.batches.close()

    return lifespan


def create_ingress_app(handle, options: IngressOptions = IngressOptions(),
                       on_ready: Callable[[str], None] | None = None,
                       on_stop: Callable[[], Awaitable[None]] | None = None) -> FastAPI:
    """The ingress FastAPI app over the replicas behind ``handle`` (a DeploymentHandle of GemmakitReplica). It
    starts answering once its router knows ``options.replicas`` replicas' URLs; then ``on_ready`` gets the served
    model's id. ``on_stop`` runs when the app stops, on its event loop (default: the handle is shut down)."""
    keys = [k.encode() for k in options.api_keys if k]
    state = IngressState(handle=handle, metrics=IngressMetrics(), keys=keys, imbalance=options.imbalance)
    # The replicas' apps serve /docs and /openapi.json (they describe the API); the ingress has none of its own.
    app = FastAPI(title="gemmakit (Ray Serve ingress)", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=_lifespan(options.replicas, on_ready, on_stop))
    app.state.ingress = state
    install_error_handlers(app)
    app.add_middleware(CatchAll)
    app.add_middleware(SizeGate, limits=options.limits)
    app.add_middleware(AuthGate, keys=state.keys, public_docs_and_metrics=options.public_docs_and_metrics)
    app.add_middleware(RequestLog, metrics=state.metrics)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    if options.data_dir is not None:  # before the catch-all: these routes are the ingress's own
        add_batches(app, options.data_dir, keys[0] if keys else None, options.rows_per_replica)
    app.add_api_route("/{path:path}", forward, methods=HTTP_METHODS)
    return app
