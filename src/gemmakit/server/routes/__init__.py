"""The HTTP routes, one module per concern: the OpenAI endpoints and the service routes around them."""

from . import chat, completions, service

ROUTERS = [service.router, chat.router, completions.router]

__all__ = ["ROUTERS"]
