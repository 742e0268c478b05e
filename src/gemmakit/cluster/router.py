"""Which replica serves a request: the one that holds its conversation's prefix, unless that one is much busier.

A request carries an affinity key (from the ingress: the conversation's session id, or its first messages, or its
prompt's first characters). Rendezvous hashing maps a key to one replica, the same one as long as that replica
lives, so the turns of a conversation land where the earlier turns' KV cache rows still are (the engine's prefix
cache then skips reading them again); when a replica goes away only its keys move. If the preferred replica has
more than ``imbalance`` requests more in flight than the least busy one, the request goes to the least busy
instead: a hot prefix (one system prompt for everyone) must not pile every user onto one replica. Requests
without a key go to the least busy replica. ``avoid`` (replica ids) steers a retried request away from the
replicas that already failed it or were full.

The ingress picks with :func:`pick_replica` over the replicas it can reach and the requests it has in flight on
each. :class:`AffinityRouter` is the Serve request router of the deployment handle, which carries only pings (the
requests themselves go over HTTP). It registers itself in
:mod:`gemmakit.cluster.registry` so the ingress can read the replicas it sees (their URLs, their count for
``/health``, their routing stats for ``/metrics``).
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

DEFAULT_IMBALANCE = 4  # requests in flight the preferred replica may have beyond the least busy one


def rendezvous_score(key: str, replica_id: str) -> int:
    """The replica with the highest score for a key is that key's home (highest random weight hashing)."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest(), "big")


def pick_replica(loads: Mapping[str, int], key: str | None, avoid: set[str] | frozenset[str] = frozenset(),
                 imbalance: int = DEFAULT_IMBALANCE) -> str | None:
    """The replica (of ``loads``: id -> requests in flight) for a request with affinity ``key``, not one of
    ``avoid`` unless every replica is; None when there is no replica."""
    candidates = [r for r in loads if r not in avoid] or list(loads)
    if not candidates:
        return None
    least_busy = min(candidates, key=lambda r: loads[r])
    if not key:
        return least_busy
    home = max(candidates, key=lambda r: rendezvous_score(key, r))
    return least_busy if loads[home] - loads[least_busy] > imbalance else home


class AffinityRouter(RequestRouter):
    """Ray Serve request router for gemmakit replicas' pings (see the module's docstring)."""

    def initialize_state(self, **_: Any) -> None:
        # Imported here, by absolute name: Serve ships this module by value (see gemmakit.cluster.registry).
        from gemmakit.cluster import registry

        registry.ROUTERS.add(self)

    def _load(self, replica: RunningReplica) -> int:
        """Requests in flight on a replica as this router last heard (0 when unknown: it will be probed)."""
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        return 0 if queue_len is None else queue_len

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Every replica, by load (Serve probes a rank's queue lengths and takes its least busy replica)."""
        return [sorted(candidate_replicas, key=self._load)]

    def replica_stats(self) -> dict[str, dict[str, Any]]:
        """Each live replica's id and its last routing stats (see GemmakitReplica.record_routing_stats)."""
        return {r.replica_id.unique_id: dict(r.routing_stats or {}) for r in self.curr_replicas.values()}
