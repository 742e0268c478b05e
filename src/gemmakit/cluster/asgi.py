"""One HTTP request, carried across processes, run through an ASGI app there, its response streamed back.

The ingress reads a request whole (its size is bounded by the SizeGate) and sends it to a replica as a
:class:`ForwardedRequest`; the replica runs it through the same FastAPI app ``gemmakit serve`` uses and hands back
the response as items: one :class:`Opening` (the replica's id, status and headers, the first body bytes: a whole
plain response, or a stream's first chunk), then the rest of the body in chunks (bytes). Each item crossing Ray
costs milliseconds, so the opening waits for the first body bytes rather than travelling alone, and chunks the
app sent while the previous one was in transit travel together.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

logger = logging.getLogger(__name__)

# Headers that describe one connection, not the request: never forwarded.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer",
                        b"proxy-authorization", b"proxy-connection"})
CANCEL_GRACE_S = 2.0  # how long an abandoned app call gets to see the disconnect and cancel its generation


@dataclass(frozen=True)
class ForwardedRequest:
    """What a replica needs to run a request through its app (picklable: it crosses Ray)."""

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: tuple[str, int] | None = None

    def scope(self) -> dict[str, Any]:
        """The ASGI HTTP scope of this request."""
        return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "method": self.method, "scheme": "http", "path": self.path, "raw_path": self.path.encode(),
                "query_string": self.query_string, "root_path": "", "headers": list(self.headers),
                "client": self.client, "server": ("gemmakit-replica", 0)}


@dataclass(frozen=True)
class ResponseHead:
    """The status and headers of a forwarded request's response."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


@dataclass(frozen=True)
class Opening:
    """A replica's first item for a request: who answers, the head, the body so far and whether that is all."""

    replica: str
    head: ResponseHead
    body: bytes
    complete: bool


def forwardable_headers(headers: list[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """The request headers a replica sees: the client's, less those about the connection."""
    return tuple((k, v) for k, v in headers if k.lower() not in HOP_BY_HOP)


async def _call_app(app, request: ForwardedRequest, receive, send, out: asyncio.Queue) -> None:
    """Run the app; whatever happens, end the item stream (None) so the reader never waits forever."""
    try:
        await app(request.scope(), receive, send)
    except Exception:  # the app's CatchAll answers bugs with a 500; this is for what happens around it
        logger.exception("forwarded request %s %s failed", request.method, request.path)
    finally:
        out.put_nowait(None)


def _drain(first: dict, out: asyncio.Queue) -> tuple[ResponseHead | None, bytes, bool]:
    """The message ``first`` and those already queued behind it, joined: the head if among them, the body bytes,
    and whether the response is complete (or the app ended without completing it)."""
    head, body = None, []
    message: dict | None = first
    while True:
        if message is None:  # the app returned
            return head, b"".join(body), True
        if message["type"] == "http.response.start":
            head = ResponseHead(message["status"], tuple(message.get("headers", ())))
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))
            if not message.get("more_body", False):
                return head, b"".join(body), True
        if out.empty():
            return head, b"".join(body), False
        message = out.get_nowait()


async def run_request(app, request: ForwardedRequest) -> AsyncIterator[tuple[ResponseHead | None, bytes, bool]]:
    """Run ``request`` through the ASGI ``app``; yield what it sent as (head or None, body bytes, complete), the
    head in the first. Closing the iterator early (the client went away) tells the app the client disconnected,
    which cancels its generation, as a dropped connection does in ``gemmakit serve``."""
    out: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        out.put_nowait(message)

    task = asyncio.create_task(_call_app(app, request, receive, send, out))
    try:
        complete = False
        while not complete:
            head, body, complete = _drain(await out.get(), out)
            yield head, body, complete
    finally:
        disconnected.set()
        if not task.done():
            await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
            task.cancel()


async def respond_in_items(app, request: ForwardedRequest, replica: str) -> AsyncIterator[Opening | bytes]:
    """The items a replica sends back for ``request``: an :class:`Opening` once the head and some body (or the
    end) are there, then body chunks."""
    head: ResponseHead | None = None
    opened = False
    pending: list[bytes] = []
    async for part_head, body, complete in run_request(app, request):
        if opened:
            if body:
                yield body
            continue
        head = head or part_head
        pending.append(body)
        if head is not None and (any(pending) or complete):
            opened = True
            yield Opening(replica, head, b"".join(pending), complete)
    if not opened:  # the app ended without a response (its CatchAll makes this unlikely): a 500 of our shape
        yield Opening(replica, ResponseHead(500, ((b"content-type", b"application/json"),)),
                      b'{"error": {"message": "the replica\'s app ended without answering", "type": "server_error", '
                      b'"param": null, "code": null}}', True)
