"""The HTTP routes, one module per concern: the OpenAI endpoints and the service routes around them."""

from . import batches, chat, completions, feedback, moderations, service

ROUTERS = [service.router, chat.router, completions.router, moderations.router, feedback.router,
           batches.router]

__all__ = ["ROUTERS"]
