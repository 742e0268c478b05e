"""The request path of the ingress: a request relayed to one replica's port and its answer back, as plain ASGI.

The ingress picks the replica (:func:`~gemmakit.cluster.router.pick_replica`: conversation affinity, else the least
busy), relays the request over HTTP (:mod:`gemmakit.cluster.proxy`; streams as they come), counting it in flight on
that replica meanwhile (see :class:`InFlight`). A request whose replica fails before any of its answer reached the
client is retried on another (a stream's head goes to the client as it comes, so a stream is also retried while
the client has none of its events; see :class:`StreamRelay`); a replica that answers 429 or 503 is skipped for the
next one.

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

    def __init__(self, replica: str, cause: BaseException) -> None:
        super().__init__(f"replica {replica} failed: {cause!r}")
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
    """One try of a request on one replica: its answer's head (a plain answer: whole)."""

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
    """Send ``request`` to a replica and read its answer's head (a plain answer: whole).

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


class AllReplicasFailed(Exception):
    """Every replica tried for a request failed before answering it."""


@dataclass
class RelayedRequest:
    """One client request on its way to a replica: the replicas tried so far, and the choice of the next."""

    state: IngressState
    request: ForwardedRequest
    key: str | None  # its affinity key (see affinity_key)
    tried: list[str] = field(default_factory=list)  # the replicas sent it so far, in order (with repeats)

    def tries_left(self) -> int:
        """The sends this request has left: a few more than there are replicas, over its whole life (a stream
        moved to another replica counts its first tries), so that a failing replica is never tried forever."""
        return max(3, len(reachable_replicas()) + 2) - len(self.tried)

    async def answer(self, retry: bool = False) -> Attempt:
        """The first answer that is not a full replica's (429, 503), trying replicas in turn; if every live one is
        full, the last one's answer. ``retry``: the request was sent before, to a replica that failed.

        Raises:
            NoReachableReplica: no replica is live (Serve is starting new ones).
            AllReplicasFailed: every replica tried failed before answering.
        """
        full: Attempt | None = None  # the last replica that answered 429 or 503: its answer if every one does
        try:
            while self.tries_left() > 0:
                if retry:
                    self.state.metrics.retries.inc()
                try:
                    attempt = await try_once(self.state, self.request, self.key, self.tried)
                except ReplicaLost as exc:
                    self.state.metrics.failures.inc()
                    logger.warning("%s; trying another replica", exc)
                    self.tried.append(exc.replica)
                    retry = True
                    continue
                retry = False
                self.tried.append(attempt.replica)
                if full is not None:
                    await full.release()
                full = attempt
                if attempt.answer.head.status not in SKIP_STATUSES or len(set(self.tried)) >= len(reachable_replicas()):
                    break
            if full is None:
                raise AllReplicasFailed()
            answer, full = full, None
            return answer
        finally:
            if full is not None:
                await full.release()

    async def stream_elsewhere(self) -> Attempt | None:
        """After the stream's replica failed before its first event: the same request's event stream from another
        replica, or None when none gives one (none live, all failed or full)."""
        try:
            attempt = await self.answer(retry=True)
        except (NoReachableReplica, AllReplicasFailed):
            return None
        if attempt.answer.head.status == 200 and attempt.answer.rest is not None:
            return attempt
        await attempt.release()
        return None


async def whole_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An event stream's bytes cut at event boundaries (a blank line): what a read returned past the last one waits
    for the next read, so a stream cut short ends between two events, never inside one."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        end = pending.rfind(b"\n\n")
        if end >= 0:
            yield pending[:end + 2]
            pending = pending[end + 2:]
    if pending:  # the replica ended its stream without a blank line: pass the rest as it is
        yield pending


REPLICA_FAILED_EVENT = sse({"error": {"message": "the replica serving this stream failed; the answer is incomplete",
                                      "type": "server_error", "param": None, "code": "replica_failed"}}).encode()


class StreamRelay:
    """The events of a stream whose head the client has: relayed as they come from the replica. If the replica
    fails before its first event, the request goes to another replica, whose events continue the stream (an SSE
    comment names it: the response's header named the first); if it fails later, or no other replica takes it,
    the stream ends with an error event and [DONE], as the single server ends a stream its engine could not
    finish."""

    def __init__(self, relayed: RelayedRequest, attempt: Attempt) -> None:
        self.relayed, self.attempt = relayed, attempt

    async def events(self) -> AsyncIterator[bytes]:
        metrics = self.relayed.state.metrics
        started = False  # an event of this request reached the client: too late to ask another replica
        while True:
            try:
                async for chunk in whole_events(self.attempt.answer.rest):
                    started = True
                    yield chunk
                return
            except TransportError as exc:
                metrics.failures.inc()
                logger.warning("replica %s failed during a stream: %r", self.attempt.replica, exc)
                elsewhere = None if started else await self.relayed.stream_elsewhere()
                if elsewhere is None:
                    yield REPLICA_FAILED_EVENT
                    yield b"data: [DONE]\n\n"
                    return
                failed, self.attempt = self.attempt, elsewhere
                await failed.release()
                yield f": retried on replica {elsewhere.replica}\n\n".encode()

    async def release(self) -> None:
        await self.attempt.release()


async def _pump(stream: StreamRelay, send) -> None:
    async for chunk in stream.events():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _client_gone(receive) -> None:
    """Returns when the client has disconnected (or, with uvicorn, once the response is complete): the request's
    body was read already, so nothing else can come."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def stream_to_client(stream: StreamRelay, receive, send) -> None:
    """Relay a stream's events until it ends or the client leaves; either way the replica's connection is
    released (closed mid-stream, which cancels the generation there) and the request no longer counted."""
    pump = asyncio.ensure_future(_pump(stream, send))
    gone = asyncio.ensure_future(_client_gone(receive))
    try:
        await asyncio.wait((pump, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        pump.cancel()
        gone.cancel()
        await asyncio.gather(pump, gone, return_exceptions=True)
        await stream.release()
    if not pump.cancelled() and pump.exception() is not None:
        raise pump.exception()


async def respond(relayed: RelayedRequest, attempt: Attempt, receive, send) -> None:
    """The client's response: the replica's status and headers (and its id), its body whole or streamed. A
    stream's head goes to the client as soon as the replica sends it (before the first token), as the single
    server sends it: the client is ready for the first token when it comes."""
    answer = attempt.answer
    headers = answer.head.relayed_headers() + [(b"x-gemmakit-replica", attempt.replica.encode())]
    if answer.rest is None:
        await attempt.release()
        body = b"".join(answer.chunks)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": answer.head.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    stream = StreamRelay(relayed, attempt)
    try:
        await send({"type": "http.response.start", "status": answer.head.status, "headers": headers})
    except BaseException:
        await stream.release()
        raise
    await stream_to_client(stream, receive, send)


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
    """An ASGI request for a replica: relayed to one, retried on another while none of its answer reached the
    client, a full replica skipped for the next one."""
    try:
        body = await read_body(receive)
    except ClientDisconnected:
        return
    forwarded = ForwardedRequest(scope["method"], scope["path"], scope.get("query_string", b""),
                                 forwardable_headers(scope["headers"]), body)
    relayed = RelayedRequest(state, forwarded, affinity_key(forwarded.path, Headers(scope=scope), body))
    try:
        attempt = await relayed.answer()
    except NoReachableReplica:  # Serve is starting new ones (or they have not reported their URL yet)
        await error_response(503, "no replica is running (they are being replaced): retry shortly", "server_error",
                             code="no_replica", headers={"Retry-After": "5"})(scope, receive, send)
        return
    except AllReplicasFailed:
        await error_response(503, "every replica tried failed this request; retry later", "server_error",
                             code="replicas_failed", headers={"Retry-After": "5"})(scope, receive, send)
        return
    await respond(relayed, attempt, receive, send)
