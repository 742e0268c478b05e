"""Start gemmakit on Ray Serve: Ray (a local instance or an existing cluster), the replica deployment, the ingress.

``gemmakit serve --ray`` calls :func:`serve_on_ray`; a Python program can call :func:`start` and
:func:`create_ingress_app` itself. No Serve HTTP proxy is started: the ingress is this process's own uvicorn
server, one hop in front of the replicas.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidParameterError
from .replica import GemmakitReplica, ReplicaSpec
from .registry import live_replica_stats
from .router import DEFAULT_IMBALANCE, AffinityRouter

ROUTER_PATH = f"{AffinityRouter.__module__}.{AffinityRouter.__qualname__}"

logger = logging.getLogger("gemmakit.cluster")

APP_NAME = "gemmakit"
DEPLOYMENT_NAME = "GemmakitReplica"
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # requests and chunks are small; a local instance needs little shared memory
HEALTH_CHECK_PERIOD_S = 2.0  # how soon Serve notices a replica whose engine stopped
ROUTING_STATS_PERIOD_S = 1.0  # how often replicas report their metrics and load to the routers


@dataclass(frozen=True)
class RayOptions:
    """Where the replicas run and how many (``replicas``, or ``min_replicas``..``max_replicas`` autoscaled on
    requests in flight per replica)."""

    address: str | None = None  # an existing cluster (``ray start --head`` printed it); None: a local instance
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    replica_cpus: float = 1.0
    imbalance: int = DEFAULT_IMBALANCE  # see gemmakit.cluster.router
    shutdown_timeout: float = 30.0  # seconds a stopping replica lets its requests finish

    def check(self) -> None:
        if self.replicas < 1:
            raise InvalidParameterError(f"--replicas {self.replicas}: at least 1")
        if self.replica_cpus <= 0:
            raise InvalidParameterError(f"--replica-cpus {self.replica_cpus}: must be positive")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise InvalidParameterError("--min-replicas and --max-replicas go together (autoscaling between them)")
        if self.min_replicas is not None and not 0 < self.min_replicas <= self.max_replicas:
            raise InvalidParameterError(f"--min-replicas {self.min_replicas} --max-replicas {self.max_replicas}: "
                                        "need 1 <= min <= max")


def deployment_options(options: RayOptions, max_batch: int, max_waiting: int) -> dict[str, Any]:
    """The Serve deployment's options. A replica takes more requests than it has rows and queue slots, so that a
    full replica answers 429 itself (and the ingress tries another) rather than Serve queueing without bound."""
    from ray.serve.config import RequestRouterConfig

    opts: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": max_batch + max_waiting + 8,
        "ray_actor_options": {"num_cpus": options.replica_cpus},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "graceful_shutdown_timeout_s": options.shutdown_timeout,
        # By import path, not the class: Serve would ship a class by value, a copy whose module globals (the
        # router registry the ingress reads) are not the ingress's.
        "request_router_config": RequestRouterConfig(request_router_class=ROUTER_PATH,
                                                     request_router_kwargs={"imbalance": options.imbalance},
                                                     request_routing_stats_period_s=ROUTING_STATS_PERIOD_S),
    }
    if options.min_replicas is None:
        opts["num_replicas"] = options.replicas
    else:  # Serve's autoscaler, on requests in flight per replica: about a replica's rows each
        opts["autoscaling_config"] = {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                                      "target_ongoing_requests": max_batch, "upscale_delay_s": 10.0,
                                      "downscale_delay_s": 120.0}
    return opts


def start_ray(address: str | None) -> bool:
    """Connect to the cluster at ``address``, or start a local instance with this machine's cores; True when
    this process started Ray (and so stops it at the end)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        ray.init(address=address, **common)
        return False
    ray.init(num_cpus=os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
    return True


def wait_for_router(handle, replicas: int, timeout: float = 60.0) -> dict[str, str]:
    """Send pings until the ingress's router sees ``replicas`` replicas (so /health is right from the start);
    return the last replica's answer (its id and model id)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = handle.ping.remote().result(timeout_s=timeout)
        stats = live_replica_stats()
        if stats is not None and len(stats) >= replicas:
            return answer
        if time.monotonic() > deadline:
            logger.warning("the router sees %d of %d replicas after %.0f s", len(stats or {}), replicas, timeout)
            return answer
        time.sleep(0.2)


def start(spec: ReplicaSpec, options: RayOptions, max_batch: int, max_waiting: int) -> tuple[Any, str]:
    """Deploy the replicas (Ray must be running); once they serve, return the deployment handle and the model id
    they report."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    deployment = serve.deployment(GemmakitReplica).options(**deployment_options(options, max_batch, max_waiting))
    handle = serve.run(deployment.bind(spec), name=APP_NAME, route_prefix=None)
    answer = wait_for_router(handle, options.min_replicas or options.replicas)
    return handle, answer["model"]


def serve_ingress(handle, host: str, port: int, api_keys: list[str], limits, public_docs_and_metrics: bool,
                  shutdown_timeout: float) -> None:
    """Run the ingress on ``host:port`` until SIGTERM or Ctrl-C (then requests in flight get ``shutdown_timeout``
    seconds to finish)."""
    import uvicorn

    from ..server.lifecycle import SignalServer
    from .ingress import create_ingress_app

    app = create_ingress_app(handle, api_keys, limits, public_docs_and_metrics)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=int(shutdown_timeout))
    SignalServer(config).run()


def stop(started_ray: bool) -> None:
    """Remove the replicas; stop Serve and Ray when this process started them."""
    import ray
    from ray import serve

    try:
        if started_ray:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        if started_ray:
            ray.shutdown()
