"""The chat page at ``/``: static files shipped inside the package (no CDN, no build step).

The page is plain HTML, CSS and JavaScript (``static/``) with two vendored libraries (``static/vendor/``: marked
renders Markdown, DOMPurify strips anything executable from it). It calls this server's own OpenAI API, so it
needs no route of its own beyond the files; its Content-Security-Policy lets it load and call nothing else.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
# Scripts, styles and requests from this server only: a model's answer that slipped past the sanitizer still
# could not load or send anything.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


async def chat_page() -> FileResponse:
    """The page itself (no secrets in it: the API key is typed into it and kept in the browser)."""
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                                         "X-Content-Type-Options": "nosniff"})


def add_chat_page(app: FastAPI) -> None:
    """Serve the chat page at ``/`` and its files under ``/static``."""
    app.add_api_route("/", chat_page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
