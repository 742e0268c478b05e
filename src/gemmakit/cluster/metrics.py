"""Prometheus metrics of the Ray ingress: its own counters, and the replicas' metrics labelled by replica.

Each replica exposes the single server's metrics (``gemmakit_requests``, ``gemmakit_time_to_first_token_seconds``,
``gemmakit_queue_depth``, ...). The ingress republishes every sample with a ``replica`` label, one family per name,
so ``sum by (...)`` over replicas gives the whole deployment and nothing needs a second scrape target.
"""

from __future__ import annotations

from typing import Any, Iterable


class IngressMetrics:
    """The ingress's own metrics (its registry; the names do not collide with the replicas')."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        from .registry import reachable_replicas

        self.registry = CollectorRegistry()
        self.requests = Counter("gemmakit_ingress_requests", "HTTP requests the ingress answered",
                                ["path", "status"], registry=self.registry)
        self.retries = Counter("gemmakit_ingress_retries", "requests sent again after their replica failed "
                               "before answering", registry=self.registry)
        self.failures = Counter("gemmakit_ingress_replica_failures", "requests whose replica failed (died or "
                                "became unreachable) while serving them", registry=self.registry)
        Gauge("gemmakit_ingress_live_replicas", "replicas the ingress can route to",
              registry=self.registry).set_function(lambda: len(reachable_replicas()))


class _Republished:
    """A collector that yields the replicas' metric families, each sample with its replica's label."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts

    def collect(self) -> Iterable[Any]:
        from prometheus_client.metrics_core import Metric
        from prometheus_client.parser import text_string_to_metric_families

        families: dict[str, Metric] = {}
        for replica, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                for sample in family.samples:
                    merged.samples.append(sample._replace(labels={**sample.labels, "replica": replica}))
        return list(families.values())


def merged_metrics(ingress: IngressMetrics, replica_stats: dict[str, dict[str, Any]]) -> bytes:
    """The exposition text of the ingress's metrics followed by every replica's, labelled by replica."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Republished({r: s["metrics"] for r, s in replica_stats.items() if s.get("metrics")}))
    return generate_latest(ingress.registry) + generate_latest(registry)
