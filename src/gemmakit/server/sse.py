"""Server-sent events: the streamed responses of both generation endpoints.

Each choice's chunks go out in turn, an error event if generation fails, the usage chunk when asked, then
``[DONE]``; a client that goes away cancels its generations (their cache rows free at the engine's next step).
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..engine import RequestStream, RequestTimeoutError
from ..errors import GemmakitError
from .state import note

ChoiceChunks = Callable[[int, RequestStream, dict[str, int]], AsyncIterator[str]]


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator: Starlette abandons it, unclosed, when the
    client disconnects, which would leave the generation (and its slot) suspended forever."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def guarded(events: AsyncIterator[str], request: Request) -> AsyncIterator[str]:
    """Pass an SSE stream through; stop and close it (which cancels its generations, freeing their cache rows
    at the engine's next step) as soon as the client goes away."""
    next_check = 0.0
    try:
        async for item in events:
            # Starlette's own listener also ends the response on a disconnect; this check (a receive() under a
            # cancelled scope) runs at most every 50 ms rather than for every token.
            now = time.monotonic()
            if now >= next_check:
                if await request.is_disconnected():
                    break
                next_check = now + 0.05
            yield item
    finally:
        await events.aclose()


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_error(exc: GemmakitError) -> str:
    kind, code = ("timeout_error", "request_timeout") if isinstance(exc, RequestTimeoutError) else (
        "server_error", None)
    return sse({"error": {"message": str(exc), "type": kind, "param": None, "code": code}})


async def framed(body, streams: list[RequestStream], base: dict[str, Any], prompt_tokens: int, request: Request,
                 choice_chunks: ChoiceChunks) -> AsyncIterator[str]:
    """The SSE frame both endpoints share: each choice's chunks in turn, an error event if generation fails, the
    usage chunk when asked, then [DONE]. The streams are cancelled whatever happens (a client that went away frees
    its rows) and the request's log line gets the token count."""
    count = {"completion_tokens": 0}
    try:
        for index, stream in enumerate(streams):
            async for chunk in choice_chunks(index, stream, count):
                yield chunk
    except GemmakitError as exc:
        yield sse_error(exc)
    finally:
        for stream in streams:
            stream.cancel()
        note(request, **count)
    if body.stream_options and body.stream_options.include_usage:
        done = count["completion_tokens"]
        yield sse({**base, "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": done,
                                                    "total_tokens": prompt_tokens + done}})
    yield "data: [DONE]\n\n"


def stream_response(events: AsyncIterator[str], request: Request) -> StreamingResponse:
    """The SSE response of a generation, closed (and its generations cancelled) when the client leaves."""
    return ClosingStreamingResponse(guarded(events, request), media_type="text/event-stream")
