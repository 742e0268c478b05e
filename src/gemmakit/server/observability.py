"""Prometheus metrics and the one-line JSON request log."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import AsyncIterator

from ..engine import Engine, RequestStream
from ..errors import GemmakitError
from ..generate import StreamEvent

logger = logging.getLogger("gemmakit.server")


class Metrics:
    """Prometheus metrics of one server (its own registry, so several apps in a process do not collide)."""

    def __init__(self, engine: Engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("gemmakit_requests", "HTTP requests", ["path", "status"], registry=self.registry)
        self.prompt_tokens = Counter("gemmakit_prompt_tokens", "prompt tokens processed", registry=self.registry)
        self.generated_tokens = Counter("gemmakit_generated_tokens", "tokens generated", registry=self.registry)
        self.cancelled = Counter("gemmakit_requests_cancelled", "generations the client stopped before they ended",
                                 registry=self.registry)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("gemmakit_time_to_first_token_seconds", "time to first token", buckets=buckets,
                              registry=self.registry)
        self.itl = Histogram("gemmakit_inter_token_latency_seconds", "time between tokens", buckets=buckets,
                             registry=self.registry)
        self.safety_flags = Counter("gemmakit_safety_flags", "texts flagged by the safety guards, by direction and "
                                    "category", ["direction", "category"], registry=self.registry)
        self.safety_actions = Counter("gemmakit_safety_actions", "safety actions taken (block, redact, flag), by "
                                      "direction and category", ["direction", "category", "action"],
                                      registry=self.registry)
        stats = engine.prefix_stats
        gauges = {
            "gemmakit_running_sequences": ("sequences holding a KV cache row", lambda: engine.running),
            "gemmakit_queue_depth": ("requests waiting for a KV cache row", lambda: engine.waiting),
            "gemmakit_kv_cache_usage_ratio": ("share of the KV cache tokens in use",
                                              lambda: engine.cache_tokens / engine.cache_capacity),
            "gemmakit_kv_cache_rows": ("KV cache rows (most sequences at once)", lambda: engine.max_batch),
            "gemmakit_prefix_cache_hit_tokens": ("prompt tokens not read again: their keys were cached (total)",
                                                 lambda: engine.prefix_stats["hit_tokens"]),
            "gemmakit_prefix_cache_hit_rate": ("share of admitted requests that reused a cached prefix",
                                               lambda: stats["hits"] / max(stats["queries"], 1)),
            "gemmakit_prefix_cache_evictions": ("cached prefixes overwritten by another request (total)",
                                                lambda: engine.prefix_stats["evictions"]),
        }
        for name, (doc, value) in gauges.items():
            Gauge(name, doc, registry=self.registry).set_function(value)

    def safety(self, direction: str, actions: dict[str, str]) -> None:
        """Count one safety decision: each flagged category and the action taken for it."""
        for category, action in actions.items():
            self.safety_flags.labels(direction, category).inc()
            self.safety_actions.labels(direction, category, action).inc()

    async def observe(self, stream: RequestStream, prompt_tokens: int) -> AsyncIterator[StreamEvent]:
        """Pass a request's events through, recording latencies and token counts."""
        self.prompt_tokens.inc(prompt_tokens)
        start = last = time.perf_counter()
        first, finished = True, False
        try:
            async for ev in stream:
                now = time.perf_counter()
                (self.ttft if first else self.itl).observe(now - (start if first else last))
                first, last = False, now
                if not ev.stop_token:
                    self.generated_tokens.inc()
                finished = ev.finish_reason is not None
                yield ev
        except GemmakitError:
            finished = True  # ended by an error (reported to the client), not by the client
            raise
        finally:
            if not finished:
                self.cancelled.inc()
            stream.cancel()  # a no-op once finished; frees the row of an abandoned request


def route_label(scope) -> str:
    """The metrics label of a request: its route's template (``/v1/chat/completions``, ``/static``), never the raw
    path, so that no client can add labels (each unknown path would be a new time series, kept forever)."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestLog:
    """Pure ASGI middleware: counts each response in the metrics and logs one JSON line per request when its body
    (a whole stream, for SSE) has been sent. Unlike a BaseHTTPMiddleware it does not relay every stream chunk
    through an extra task and queue, which measurably slowed token streaming."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(route_label(scope), str(status["code"])).inc()
            line = {"id": uuid.uuid4().hex[:12], "method": scope["method"], "path": scope["path"],
                    "status": status["code"], "ms": round((time.perf_counter() - start) * 1000, 1)}
            line.update(scope.get("state", {}).get("log", {}))
            logger.info(json.dumps(line, default=str))
