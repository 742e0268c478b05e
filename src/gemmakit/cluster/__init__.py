"""gemmakit past one machine: replicas on Ray Serve behind one OpenAI-compatible endpoint.

- :mod:`.replica`: the deployment; each replica is one engine behind ``gemmakit serve``'s own app.
- :mod:`.router`: the Serve request router (conversation affinity, else the least busy replica).
- :mod:`.ingress`: the endpoint (same routes, auth and limits; health, metrics, retries, backpressure).
- :mod:`.launch`: Ray and Serve up and down; ``gemmakit serve --ray``.

Needs the ``ray`` extra: ``pip install "gemmakit[ray]"``.
"""

from .replica import ReplicaSpec

__all__ = ["ReplicaSpec"]
