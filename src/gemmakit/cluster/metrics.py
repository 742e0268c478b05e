"""Prometheus metrics of the Ray ingress: its own counters, and the replicas' metrics labelled by replica.

Each replica exposes the single server's metrics (``gemmakit_requests``, ``gemmakit_time_to_first_token_seconds``,
``gemmakit_queue_depth``, ...) on its own port. When ``/metrics`` is scraped, the ingress reads every reachable
replica's, at that moment, and republishes every sample with a ``replica`` label, one family per name, so
``sum by (...)`` over replicas gives the whole deployment and nothing needs a second scrape target. (Replicas once
sent their metrics every 2 s with their routing stats: text rendered whether anyone scraped or not, on the cores
the engines need, and up to 2 s old when read.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterable

import aiohttp

logger = logging.getLogger("gemmakit.cluster")

SCRAPE_TIMEOUT_S = 5.0  # a replica whose metrics take longer is left out of that scrape


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


async def _scrape(client: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> str | None:
    try:
        async with client.get(url + "/metrics", headers=headers,
                              timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)) as response:
            if response.status == 200:
                return await response.text()
            logger.warning("replica at %s answered /metrics with %d", url, response.status)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        logger.warning("no metrics from the replica at %s: %r", url, exc)
    return None


async def scrape_replicas(client: aiohttp.ClientSession, urls: dict[str, str], key: bytes | None) -> dict[str, str]:
    """Every replica's metrics text, read now (``urls``: replica id -> its URL; ``key``: an API key the replicas
    accept, if they need one); a replica that fails to answer is left out."""
    headers = {"Authorization": "Bearer " + key.decode()} if key else {}
    replicas = sorted(urls)
    texts = await asyncio.gather(*(_scrape(client, urls[r], headers) for r in replicas))
    return {replica: text for replica, text in zip(replicas, texts) if text is not None}


def merged_metrics(ingress: IngressMetrics, replica_texts: dict[str, str]) -> bytes:
    """The exposition text of the ingress's metrics followed by every replica's (``replica_texts``: replica id ->
    its metrics text), labelled by replica."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Republished(replica_texts))
    return generate_latest(ingress.registry) + generate_latest(registry)
