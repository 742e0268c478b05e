"""The routers of this process, for the ingress to read the replicas they see (count, load, metrics).

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


def live_replica_count() -> int | None:
    """How many replicas this process's router sees now; None before a router exists."""
    routers = list(ROUTERS)
    return len(routers[-1].curr_replicas) if routers else None
