"""gemmakit past one machine: replicas on Ray Serve behind one OpenAI-compatible endpoint.

- :mod:`.replica`: the deployment; each replica is one engine behind ``gemmakit serve``'s own app, on its own port.
- :mod:`.router`: which replica serves a request (conversation affinity, else the least busy), and the Serve
  request router that tells the ingress the live replicas.
- :mod:`.autoscale`: Serve's autoscaling policy, on the load the replicas report.
- :mod:`.ingress`: the endpoint (same routes, auth and limits; health, metrics, retries, backpressure).
- :mod:`.relay`, :mod:`.proxy`: a request relayed to a replica's port over HTTP, and its response back.
- :mod:`.launch`: Ray and Serve up and down; ``gemmakit serve --ray``.

Needs the ``ray`` extra: ``pip install "gemmakit[ray]"``.
"""

import os

# The deployment handle's router runs on the event loop that uses the handle (the ingress's), not on a thread of
# its own: one thread hop less for every call. Serve reads this when it is imported, so it is set here,
# before any module of this package imports ray.serve; the handle must then be first used inside that loop.
os.environ.setdefault("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "0")
# Serve's request metrics recorded as they come rather than flushed by a task every 100 ms: the handle carries
# pings only (requests go over HTTP), so the flush woke the ingress ten times a second for nothing.
os.environ.setdefault("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", "0")
# `ray start` (2.60) turns token authentication on and writes the token to ~/.ray/auth_token, but a process that
# connects to it only sends the token when told to: with a token at hand, tell it (else --ray-address fails with
# "Authentication token is missing or incorrect").
if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                                          or os.path.exists(os.path.expanduser("~/.ray/auth_token"))):
    os.environ["RAY_AUTH_MODE"] = "token"

from .replica import ReplicaSpec  # noqa: E402

__all__ = ["ReplicaSpec"]
