"""Serving engines: continuous batching of many generation requests over one model."""

from .engine import Engine, EngineBusyError, EngineStoppedError, RequestStream, RequestTimeoutError

__all__ = ["Engine", "EngineBusyError", "EngineStoppedError", "RequestStream", "RequestTimeoutError"]
