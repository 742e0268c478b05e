"""The request path of the ingress: a request relayed to one replica's port and its answer back, as plain ASGI.

The ingress picks the replica (:func:`~gemmakit.cluster.router.pick_replica`: conversation affinity, else the least
busy), relays the request over HTTP (:mod:`gemmakit.cluster.proxy`; streams as they come), counting it in flight on
that replica meanwhile (see :class:`InFlight`). A request whose replica fails before
anything reached the client is retried on another; a replica that answers 429 or 503 is skipped for the next one.

Plain ASGI rather than a FastAPI route: the route's layers (routing, exception and body-limit middleware, a task
group per streamed response) cost the ingress ~2 ms of CPU per request on the path of the first token, as much as
the relay itself. The server's own gates (keys, sizes, the request log) still stand in front of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import aiohttp
from starlette.datastructures import Headers

from ..server.errors import error_response
from ..server.sse import sse
from .metrics import IngressMetrics
from .proxy import ForwardedRequest, ReplicaResponse, TransportError, forwardable_headers, send
from .registry import reachable_replicas
from .router import DEFAULT_IMBALANCE, pick_replica

logger = logging.getLogger("gemmakit.cluster")

SKIP_STATUSES = frozenset({429, 503})  # a full or draining replica: try another before answering this
AFFINITY_CHARS = 2048  # characters of a conversation's opening (or a prompt's start) that pick its replica


class ClientDisconnected(Exception):
    """The client left before its request's body was read."""


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
    client: aiohttp.ClientSession | None = None  # made on the ingress's event loop, in its lifespan
    in_flight: Counter = field(default_factory=Counter)  # replica id -> requests this ingress is relaying to it


class InFlight:
    """A request the ingress relays to a replica, counted in ``state.in_flight`` (what picks the least busy
    replica) until it ends.

    Serve does not count it: the replica reports its own load to Serve's autoscaler (see
    :mod:`gemmakit.cluster.autoscale`). Holding a Serve call per request for Serve's count (a "lease", as the
    ingress once did) delayed one client's first token by ~6 ms on a 2-core machine and cut its tok/s to 0.90x of
    one server's, against 0.975x without."""

    def __init__(self, state: IngressState, replica: str) -> None:
        self.state, self.replica = state, replica
        self.ended = False
        state.in_flight[replica] += 1

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.state.in_flight[self.replica] -= 1


@dataclass
class Attempt:
    """One try of a request on one replica, read up to the point where the client is answered."""

    replica: str
    answer: ReplicaResponse
    counted: InFlight

    async def release(self) -> None:
        try:
            await self.answer.close()
        finally:
            self.counted.end()


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
    counted = InFlight(state, replica)
    try:
        answer = await send(state.client, urls[replica], request)
    except TransportError as exc:
        counted.end()
        raise ReplicaLost(replica, exc) from exc
    except BaseException:
        counted.end()
        raise
    return Attempt(replica, answer, counted)


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
    except TransportError as exc:
        metrics.failures.inc()
        logger.warning("replica %s failed during a stream: %r", attempt.replica, exc)
        yield sse({"error": {"message": f"the replica serving this stream failed ({type(exc).__name__}); the "
                             "answer is incomplete", "type": "server_error", "param": None,
                             "code": "replica_failed"}}).encode()
        yield b"data: [DONE]\n\n"


async def _pump(attempt: Attempt, metrics: IngressMetrics, send) -> None:
    async for chunk in relay(attempt, metrics):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _client_gone(receive) -> None:
    """Returns when the client has disconnected (or, with uvicorn, once the response is complete): the request's
    body was read already, so nothing else can come."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def stream_to_client(attempt: Attempt, metrics: IngressMetrics, receive, send) -> None:
    """Relay the rest of a stream until it ends or the client leaves; either way the replica's connection is
    released (closed mid-stream, which cancels the generation there) and the request no longer counted."""
    pump = asyncio.ensure_future(_pump(attempt, metrics, send))
    gone = asyncio.ensure_future(_client_gone(receive))
    try:
        await asyncio.wait((pump, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        pump.cancel()
        gone.cancel()
        await asyncio.gather(pump, gone, return_exceptions=True)
        await attempt.release()
    if not pump.cancelled() and pump.exception() is not None:
        raise pump.exception()


async def respond(attempt: Attempt, metrics: IngressMetrics, receive, send) -> None:
    """The client's response: the replica's status and headers (and its id), its body whole or streamed."""
    answer = attempt.answer
    headers = answer.head.relayed_headers() + [(b"x-gemmakit-replica", attempt.replica.encode())]
    if answer.rest is None:
        await attempt.release()
        body = b"".join(answer.chunks)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": answer.head.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    try:
        await send({"type": "http.response.start", "status": answer.head.status, "headers": headers})
    except BaseException:
        await attempt.release()
        raise
    await stream_to_client(attempt, metrics, receive, send)


async def read_body(receive) -> bytes:
    """The request's body, whole (its size is bounded by the SizeGate in front)."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def forward(state: IngressState, scope, receive, send) -> None:
    """An ASGI request for a replica: relayed to one, retried on another while nothing reached the client, a full
    replica skipped for the next one."""
    try:
        body = await read_body(receive)
    except ClientDisconnected:
        return
    forwarded = ForwardedRequest(scope["method"], scope["path"], scope.get("query_string", b""),
                                 forwardable_headers(scope["headers"]), body)
    key = affinity_key(forwarded.path, Headers(scope=scope), body)
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
                await error_response(503, "no replica is running (they are being replaced): retry shortly",
                                     "server_error", code="no_replica", headers={"Retry-After": "5"})(
                    scope, receive, send)
                return
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
            await error_response(503, "every replica tried failed this request; retry later", "server_error",
                                 code="replicas_failed", headers={"Retry-After": "5"})(scope, receive, send)
            return
        answer, full = full, None
        await respond(answer, state.metrics, receive, send)
    finally:
        if full is not None:
            await full.release()
