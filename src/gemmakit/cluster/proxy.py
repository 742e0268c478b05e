"""One HTTP request relayed from the ingress to a replica's port, and its response back.

The ingress reads a request whole (its size is bounded by the SizeGate), sends it to the replica's own uvicorn
server with the client's headers (less those about the connection), and reads the response up to the point where
the client is first answered: a plain response whole, an event stream's head and first chunk. Until then a failed
replica can be replaced by another; after it, the rest of the stream is relayed as it comes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

import httpx

from .replica import LEASE_HEADER

# Headers that describe one connection, not the request or response: never relayed. (Host, length, date and
# server are the relaying hop's own to set; a lease id is the ingress's own to give, never a client's.)
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer",
                        b"proxy-authorization", b"proxy-connection", b"host", b"content-length", LEASE_HEADER})
NOT_RELAYED_BACK = HOP_BY_HOP | {b"date", b"server"}
CONNECT_TIMEOUT_S = 10.0  # a replica that does not accept a connection in this long is taken as lost
MAX_CONNECTIONS = 4096  # to all replicas together; each streaming request holds one for its length


@dataclass(frozen=True)
class ForwardedRequest:
    """What the ingress sends on to a replica."""

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def with_header(self, name: bytes, value: bytes) -> "ForwardedRequest":
        return replace(self, headers=self.headers + ((name, value),))

    def target(self, base_url: str) -> str:
        query = b"?" + self.query_string if self.query_string else b""
        return base_url + self.path + query.decode("latin-1")


@dataclass(frozen=True)
class ResponseHead:
    """The status and headers of a replica's response."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)

    def relayed_headers(self) -> list[tuple[bytes, bytes]]:
        """The headers the client gets (the ingress adds its own framing, date and server)."""
        return [(k, v) for k, v in self.headers if k.lower() not in NOT_RELAYED_BACK]


@dataclass
class ReplicaResponse:
    """A replica's answer, read up to where the client is first answered (see the module's docstring)."""

    head: ResponseHead
    chunks: list[bytes]  # the whole body, or an event stream's first chunk
    rest: AsyncIterator[bytes] | None  # the rest of an event stream; None once complete
    response: httpx.Response

    async def close(self) -> None:
        """Release the connection (closing it mid-stream tells the replica's app that the client left)."""
        await self.response.aclose()


def forwardable_headers(headers: list[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """The request headers a replica sees: the client's, less those about the connection."""
    return tuple((k, v) for k, v in headers if k.lower() not in HOP_BY_HOP)


def is_event_stream(head: ResponseHead) -> bool:
    return (head.header(b"content-type") or b"").startswith(b"text/event-stream")


def replica_client() -> httpx.AsyncClient:
    """The ingress's connection pool to the replicas (no read timeout: the engine bounds a request's length)."""
    return httpx.AsyncClient(timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT_S), trust_env=False,
                             limits=httpx.Limits(max_connections=MAX_CONNECTIONS,
                                                 max_keepalive_connections=MAX_CONNECTIONS // 4))


async def send(client: httpx.AsyncClient, base_url: str, request: ForwardedRequest) -> ReplicaResponse:
    """Send ``request`` to the replica at ``base_url``; read its response up to the client's first answer.

    Raises:
        httpx.TransportError: the replica could not be reached, or failed before that point.
    """
    outgoing = client.build_request(request.method, request.target(base_url), headers=list(request.headers),
                                    content=request.body)
    response = await client.send(outgoing, stream=True)
    try:
        head = ResponseHead(response.status_code, tuple(response.headers.raw))
        if not is_event_stream(head):
            return ReplicaResponse(head, [await response.aread()], None, response)
        body: Any = response.aiter_raw()
        first = await anext(body, None)
        if first is None:
            return ReplicaResponse(head, [], None, response)
        return ReplicaResponse(head, [first], body, response)
    except BaseException:
        await response.aclose()
        raise
