"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with a fitting status, for every
failure a request can meet (bad values, unknown routes, a full queue, a timeout; a bug answers 500 and logs the
trace, which never reaches the client)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..engine import EngineBusyError, EngineStoppedError, RequestTimeoutError
from ..errors import ContextLengthError, GemmakitError
from ..safety import ContentPolicyError
from ..safety.guard import SafetyUnavailableError
from .limits import BodyTooLarge, LimitExceededError

logger = logging.getLogger("gemmakit.server")


class APIError(Exception):
    """An HTTP error a handler raises on purpose, answered as it says."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}


class ShuttingDownError(GemmakitError):
    """The server is draining for shutdown: it admits no new generation."""


def error_response(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.kind, exc.param, exc.code, exc.headers)


async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        problems.append(f"{where or 'body'}: {e.get('msg')}")
    return error_response(400, "invalid request: " + "; ".join(problems), "invalid_request_error")


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown route, wrong method
    if isinstance(exc.__cause__, BodyTooLarge):  # FastAPI's "error parsing the body", caused by the size limit
        return error_response(413, str(exc.__cause__), "invalid_request_error", code="request_too_large",
                              headers={"Connection": "close"})
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                          "invalid_request_error", headers=getattr(exc, "headers", None))


async def _gemmakit_error(_: Request, exc: GemmakitError) -> JSONResponse:
    if isinstance(exc, EngineBusyError):
        return error_response(429, str(exc), "rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(exc, LimitExceededError):
        return error_response(400, str(exc), "invalid_request_error", param=exc.param, code="limit_exceeded")
    if isinstance(exc, (ShuttingDownError, EngineStoppedError)):
        return error_response(503, str(exc), "server_error", code="shutting_down", headers={"Retry-After": "5"})
    if isinstance(exc, RequestTimeoutError):
        return error_response(408, str(exc), "timeout_error", code="request_timeout")
    if isinstance(exc, SafetyUnavailableError):
        return error_response(501, str(exc), "server_error", code="safety_unavailable")
    if isinstance(exc, ContentPolicyError):
        return error_response(400, str(exc), "invalid_request_error", code="content_policy_violation")
    code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
    return error_response(400, str(exc), "invalid_request_error", code=code)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error")  # the trace goes to the log, never to the client
    return error_response(500, "internal server error", "server_error")


class CatchAll:
    """ASGI middleware: an unexpected exception becomes a logged 500 in OpenAI's shape, and the exception stops
    here. (Starlette's own 500 handler re-raises it, and uvicorn then drops the connection: a pooled client's next
    request would fail too.)"""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def noting_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        except Exception:
            logger.exception("unhandled error")  # the trace goes to the log, never to the client
            if started:
                raise  # a response is half sent: only closing the connection can end it
            response = error_response(500, "internal server error", "server_error")
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in OpenAI's shape."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(GemmakitError, _gemmakit_error)
    app.add_exception_handler(Exception, _unexpected)
