"""API keys, checked before anything else reads the request.

A pure ASGI middleware answers 401 from the headers alone: a request without a valid key never has its body read
or parsed (a 20 MB body without a key costs nothing but the bytes the client sends). ``/health`` and the chat page's
files are always open (they hold no data: the page asks for the key itself); ``/metrics`` and the API docs
(``/docs``, ``/redoc``, ``/openapi.json``) need a key too unless the server is told they are public.
"""

from __future__ import annotations

import hmac
import json

ALWAYS_OPEN = ("/health", "/")
ALWAYS_OPEN_PREFIXES = ("/static/",)
DOCS_AND_METRICS = ("/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")

UNAUTHORIZED = json.dumps({"error": {"message": "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                     "type": "authentication_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()


def key_is_valid(authorization: bytes, keys: list[bytes]) -> bool:
    """Whether an Authorization header carries one of ``keys`` as a bearer token (constant-time comparisons, each
    key compared whatever the others gave; the key is never logged)."""
    given = authorization[7:].strip() if authorization[:7].lower() == b"bearer " else b""
    return any([hmac.compare_digest(given, k) for k in keys])


class AuthGate:
    """Refuse requests to protected paths that carry no valid key, before the app sees them."""

    def __init__(self, app, keys: list[bytes], public_docs_and_metrics: bool = False) -> None:
        self.app, self.keys = app, keys
        self.open = ALWAYS_OPEN + (DOCS_AND_METRICS if public_docs_and_metrics else ())

    def _needs_key(self, path: str) -> bool:
        return bool(self.keys) and path not in self.open and not path.startswith(ALWAYS_OPEN_PREFIXES)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self._needs_key(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        if key_is_valid(header, self.keys):
            await self.app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer"),
                                (b"content-length", str(len(UNAUTHORIZED)).encode())]})
        await send({"type": "http.response.body", "body": UNAUTHORIZED})
