"""Every input a request can grow, bounded: body and header bytes at the door (413 / 431 before the app reads
anything), then counts inside a parsed body (400 naming the field). Each limit is a ``gemmakit serve`` flag; the
defaults are in :class:`ServerLimits` and the README.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import GemmakitError

# No FastAPI here: the CLI reads ServerLimits for its flags without the [server] extra installed.


class LimitExceededError(GemmakitError):
    """A count in a request past its limit (answered 400 with ``param`` and code ``limit_exceeded``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class BodyTooLarge(Exception):
    """A request body past the server's limit (SizeGate), found while it was being read."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"request body of {size}+ bytes; this server takes at most {limit} (--max-body-bytes)")


@dataclass(frozen=True)
class ServerLimits:
    """What one request may carry.

    Attributes:
        max_body_bytes: request body (default 8 MiB: a 128k-token prompt is ~0.5 MB of text).
        max_header_bytes: all request headers together (default 16 KiB).
        max_messages: chat messages in one request (OpenAI allows 2048).
        max_stop: stop strings in one request.
        max_stop_chars: characters of one stop string.
        max_n: choices (``n``) of one request.
        max_logit_bias: ``logit_bias`` entries (OpenAI allows 300).
        max_tools: tool declarations (OpenAI allows 128).
        max_file_bytes: an upload to ``/v1/files`` (default 200 MiB, OpenAI's batch file limit); it takes the
            place of ``max_body_bytes`` there.
    """

    max_body_bytes: int = 8 << 20
    max_header_bytes: int = 16 << 10
    max_messages: int = 2048
    max_stop: int = 16
    max_stop_chars: int = 256
    max_n: int = 16
    max_logit_bias: int = 300
    max_tools: int = 128
    max_file_bytes: int = 200 << 20

    def check_request(self, body) -> None:
        """The counts of a parsed chat or completion request (APIError 400 naming the field past its limit)."""
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        _at_most(len(stops), self.max_stop, "stop", "stop strings")
        for i, stop in enumerate(stops):
            _at_most(len(stop), self.max_stop_chars, f"stop.{i}", "characters in a stop string")
        _at_most(body.n, self.max_n, "n", "choices")
        _at_most(len(body.logit_bias or {}), self.max_logit_bias, "logit_bias", "logit_bias entries")
        if hasattr(body, "messages"):
            _at_most(len(body.messages), self.max_messages, "messages", "messages")
            _at_most(len(body.tools or []), self.max_tools, "tools", "tools")


def _at_most(count: int, limit: int, param: str, what: str) -> None:
    if count > limit:
        raise LimitExceededError(f"{param}: {count} {what}; this server takes at most {limit} (a server flag sets "
                                 "it)", param)


def _error_body(message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


async def _answer(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class SizeGate:
    """ASGI middleware: 431 for headers past ``max_header_bytes``; 413 for a body past ``max_body_bytes``, from
    its Content-Length before reading a byte, or as soon as a chunked body crosses the limit."""

    def __init__(self, app, limits: ServerLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope["headers"])
        if header_bytes > self.limits.max_header_bytes:
            await _answer(send, 431, _error_body(f"request headers of {header_bytes} bytes; at most "
                                                 f"{self.limits.max_header_bytes}", "headers_too_large"))
            return
        limit = self.limits.max_file_bytes if scope["path"] == "/v1/files" else self.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _answer(send, 413, _error_body(str(BodyTooLarge(int(declared), limit)), "request_too_large"))
            return
        await self._counted(scope, receive, send, limit)

    async def _counted(self, scope, receive, send, limit: int) -> None:
        """Run the app with a receive that stops a body (chunked, or longer than declared) past the limit."""
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # FastAPI turns an error while reading the body into a 400 (HTTPException) caused by this one;
                    # the error handlers answer it as 413 (errors._http_error). Outside FastAPI's body reading it
                    # comes back here.
                    raise BodyTooLarge(seen, limit)
            return message

        async def noting_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, noting_send)
        except BodyTooLarge as exc:
            if not started:
                await _answer(send, 413, _error_body(str(exc), "request_too_large"))
