"""The routers of this process, for the ingress to read the replicas they see (URLs, count, load).

Its own module: Serve ships the router's module to the handle's process by value (cloudpickle), so globals kept
there would be a copy; this module is imported normally, one per process.
"""

from __future__ import annotations

import weakref
from typing import Any

ROUTERS: "weakref.WeakSet[Any]" = weakref.WeakSet()  # gemmakit.cluster.router.AffinityRouter instances


def live_replica_stats() -> dict[str, dict[str, Any]] | None:
    """The replicas this process's router sees now, each with its last routing stats; None before a router
    exists (it is made with the first request through the deployment handle)."""
    routers = list(ROUTERS)
    return routers[-1].replica_stats() if routers else None


def reachable_replica_stats() -> dict[str, dict[str, Any]]:
    """The routing stats of the live replicas that have told this process's router their URL."""
    return {replica: s for replica, s in (live_replica_stats() or {}).items() if s.get("url")}


def reachable_replicas() -> dict[str, str]:
    """The live replicas that have told this process's router their URL (in their routing stats): id -> URL."""
    return {replica: s["url"] for replica, s in reachable_replica_stats().items()}
