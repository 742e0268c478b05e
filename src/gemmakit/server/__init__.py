"""OpenAI-compatible HTTP server (``gemmakit serve``)."""

from .app import create_app

__all__ = ["create_app"]
