"""OpenAI-compatible HTTP server (``gemmakit serve``); needs the ``[server]`` extra (FastAPI, uvicorn).

``create_app`` is imported on first use, so that the parts without FastAPI (``limits``) load without the extra.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
