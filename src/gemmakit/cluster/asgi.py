"""One HTTP request, carried across processes, run through an ASGI app there, its response streamed back.

The ingress reads a request whole (its size is bounded by the SizeGate) and sends it to a replica as a
:class:`ForwardedRequest`; the replica runs it through the same FastAPI app ``gemmakit serve`` uses and hands back
the response as items: a :class:`ResponseHead` (status and headers), then body chunks (bytes). Chunks the app sent
while the previous one was in transit travel together, so a busy replica does not pay Ray's per-item cost for every
token of every stream.
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


def _next_items(first: dict, out: asyncio.Queue) -> tuple[list[Any], bool]:
    """Turn the message ``first`` and the messages already queued behind it into items (a head, then the body
    chunks joined); the flag says whether the response is complete (or the app ended without completing it)."""
    items: list[Any] = []
    body: list[bytes] = []
    message: dict | None = first
    done = False
    while True:
        if message is None:  # the app returned
            done = True
            break
        if message["type"] == "http.response.start":
            items.append(ResponseHead(message["status"], tuple(message.get("headers", ()))))
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))
            if not message.get("more_body", False):
                done = True
                break
        if out.empty():
            break
        message = out.get_nowait()
    if any(body):
        items.append(b"".join(body))
    return items, done


async def run_request(app, request: ForwardedRequest) -> AsyncIterator[Any]:
    """Run ``request`` through the ASGI ``app``; yield a :class:`ResponseHead`, then the body in chunks. Closing
    the iterator early (the client went away) tells the app the client disconnected, which cancels its
    generation, as a dropped connection does in ``gemmakit serve``."""
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
        while (message := await out.get()) is not None:
            items, done = _next_items(message, out)
            for item in items:
                yield item
            if done:
                break
    finally:
        disconnected.set()
        if not task.done():
            await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
            task.cancel()
