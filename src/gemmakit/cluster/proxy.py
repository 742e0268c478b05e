"""One HTTP request relayed from the ingress to a replica's port, and its response back.

The ingress reads a request whole (its size is bounded by the SizeGate), sends it to the replica's own uvicorn
server with the client's headers (less those about the connection), and reads the response's head (a plain
response: whole). The ingress then answers the client, and relays an event stream's body as it comes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator

import aiohttp

# Headers that describe one connection, not the request or response: never relayed. (Host, length, date and
# server are the relaying hop's own to set.)
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te", b"trailer",
                        b"proxy-authorization", b"proxy-connection", b"host", b"content-length"})
NOT_RELAYED_BACK = HOP_BY_HOP | {b"date", b"server"}
CONNECT_TIMEOUT_S = 10.0  # a replica that does not accept a connection in this long is taken as lost
MAX_CONNECTIONS = 4096  # to all replicas together; each streaming request holds one for its length
# Headers aiohttp would add on its own: a relayed request carries only the client's (and the hop's own Host and
# Content-Length).
NOT_ADDED = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
TransportError = aiohttp.ClientError  # the replica was unreachable, or failed before its response ended


@dataclass(frozen=True)
class ForwardedRequest:
    """What the ingress sends on to a replica."""

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

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
        return [(k.lower(), v) for k, v in self.headers if k.lower() not in NOT_RELAYED_BACK]


@dataclass
class ReplicaResponse:
    """A replica's answer: its head, and its body whole or (an event stream) to be read as it comes."""

    head: ResponseHead
    chunks: list[bytes]  # a plain response's whole body (an event stream: none yet)
    rest: AsyncIterator[bytes] | None  # an event stream's body, as it comes; None for a plain response
    response: aiohttp.ClientResponse

    async def close(self) -> None:
        """Release the connection: back to the pool once the body was read to its end, else closed (which tells
        the replica's app that the client left)."""
        if self.response.content.is_eof():
            self.response.release()
        else:
            self.response.close()


def forwardable_headers(headers: list[tuple[bytes, bytes]]) -> tuple[tuple[bytes, bytes], ...]:
    """The request headers a replica sees: the client's, less those about the connection."""
    return tuple((k, v) for k, v in headers if k.lower() not in HOP_BY_HOP)


def is_event_stream(head: ResponseHead) -> bool:
    return (head.header(b"content-type") or b"").startswith(b"text/event-stream")


def replica_client() -> aiohttp.ClientSession:
    """The ingress's connection pool to the replicas (on the running event loop). No read timeout: the engine
    bounds a request's length. aiohttp rather than httpx: relaying one request cost the ingress ~3.7 ms more CPU
    with httpx (its pure-Python HTTP parser), most of it on the path of the first token. No cookie jar: the pool
    is shared by every client, and a cookie one client's response set must not ride along with another's
    request (the Set-Cookie header itself is relayed to the client it was meant for). aiohttp's default jar
    ignores cookies from IP addresses, which is how replicas are reached today, but not from a named host."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
                                 cookie_jar=aiohttp.DummyCookieJar(),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
                                 auto_decompress=False, skip_auto_headers=NOT_ADDED)


async def _chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async for chunk in response.content.iter_any():
        yield chunk


async def send(client: aiohttp.ClientSession, base_url: str, request: ForwardedRequest) -> ReplicaResponse:
    """Send ``request`` to the replica at ``base_url``; read its response's head (a plain response: whole).

    Raises:
        TransportError: the replica could not be reached, or failed before that point.
    """
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers]
    response = await client.request(request.method, request.target(base_url), headers=headers, data=request.body)
    try:
        head = ResponseHead(response.status, tuple(response.raw_headers))
        if is_event_stream(head):
            return ReplicaResponse(head, [], _chunks(response), response)
        return ReplicaResponse(head, [await response.read()], None, response)
    except BaseException:
        response.close()
        raise
