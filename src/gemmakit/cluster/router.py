"""Which replica serves a request: the one that holds its conversation's prefix, unless that one is much busier.

A request carries an affinity key (from the ingress: the conversation's session id, or a hash of its first
messages or its prompt's first characters). Rendezvous hashing maps a key to one replica, the same one as long as
that replica lives, so the turns of a conversation land where the earlier turns' KV cache rows still are (the
engine's prefix cache then skips reading them again); when a replica goes away only its keys move. If the preferred
replica has more than ``imbalance`` requests more in flight than the least busy one, the request goes to the least
busy instead: a hot prefix (one system prompt for everyone) must not pile every user onto one replica.

Requests without a key go to the least busy replica. ``avoid`` (replica ids) steers a retried request away from
the replicas that already failed it or were full.

The router runs inside the process that holds the deployment handle (the ingress); it registers itself in
:mod:`gemmakit.cluster.registry` so the ingress can read the replicas it sees (their count for ``/health``, their
routing stats for ``/metrics``).
"""

from __future__ import annotations

import hashlib
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

DEFAULT_IMBALANCE = 4  # requests in flight the preferred replica may have beyond the least busy one


def rendezvous_score(key: str, replica_id: str) -> int:
    """The replica with the highest score for a key is that key's home (highest random weight hashing)."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica_id}".encode(), digest_size=8).digest(), "big")


class AffinityRouter(RequestRouter):
    """Ray Serve request router for gemmakit replicas (see the module's docstring)."""

    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, **_: Any) -> None:
        # Imported here, by absolute name: Serve ships this module by value (see gemmakit.cluster.registry).
        from gemmakit.cluster import registry

        self.imbalance = imbalance
        registry.ROUTERS.add(self)

    def _load(self, replica: RunningReplica) -> int:
        """Requests in flight on a replica as this router last heard (0 when unknown: it will be probed)."""
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        return 0 if queue_len is None else queue_len

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks of replicas, the first the most preferred: the key's home alone when it is not too busy, then
        everyone by load (Serve probes a rank's queue lengths and takes its least busy replica)."""
        kwargs = pending_request.kwargs if pending_request is not None else {}
        avoid = set(kwargs.get("avoid") or ())
        candidates = [r for r in candidate_replicas if r.replica_id.unique_id not in avoid] or candidate_replicas
        by_load = sorted(candidates, key=self._load)
        key = kwargs.get("affinity")
        if not key or not by_load:
            return [by_load]
        home = max(candidates, key=lambda r: rendezvous_score(key, r.replica_id.unique_id))
        if self._load(home) - self._load(by_load[0]) > self.imbalance:
            return [by_load]
        return [[home], [r for r in by_load if r is not home]]

    def replica_stats(self) -> dict[str, dict[str, Any]]:
        """Each live replica's id and its last routing stats (see GemmakitReplica.record_routing_stats)."""
        return {r.replica_id.unique_id: dict(r.routing_stats or {}) for r in self.curr_replicas.values()}

