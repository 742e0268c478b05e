"""Start gemmakit on Ray Serve: Ray (a local instance or an existing cluster), the replica deployment, the ingress.

``gemmakit serve --ray`` calls :func:`serve_on_ray`; a Python program can call :func:`start` and
:func:`create_ingress_app` itself. No Serve HTTP proxy is started: the ingress is this process's own uvicorn
server, one hop in front of the replicas.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InvalidParameterError
from .autoscale import POLICY_PATH
from .replica import SHUTDOWN_TIMEOUT_S, GemmakitReplica, ReplicaSpec, drain_timeout_for
from .router import AffinityRouter

ROUTER_PATH = f"{AffinityRouter.__module__}.{AffinityRouter.__qualname__}"

logger = logging.getLogger("gemmakit.cluster")

APP_NAME = "gemmakit"
DEPLOYMENT_NAME = "GemmakitReplica"
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # requests and chunks are small; a local instance needs little shared memory
HEALTH_CHECK_PERIOD_S = 2.0  # how soon Serve notices a replica whose engine stopped
ROUTING_STATS_PERIOD_S = 2.0  # how often replicas report their URL and load to the routers
# The replicas' settings: user code on the replica's main event loop (its calls are few: pings, stats), their
# load reported to Serve's autoscaler every 2 s rather than 10 (see LOOK_BACK_S), Serve's own request metrics
# recorded as they come rather than flushed every 100 ms (requests come over HTTP, so Serve's have nothing to
# record: the flush was a wake-up ten times a second for nothing; see also gemmakit.cluster), and the niceness of
# `gemmakit serve`. Ray starts its workers at nice 15, below everything else on the node, which suits background
# tasks but not an engine serving users: on 2 cores, every ingress, client or raylet wake-up then preempted the
# engine's threads (first token 1.17x slower than `gemmakit serve`, paired, and 1.05x at nice 0). Serve's other
# actors stay at 15.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_worker_niceness": "0",
               "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "2", "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "0"}
# The window over which Serve's autoscaler averages the replicas' load (its default: 30 s). A generation lasts
# seconds, not milliseconds: 15 s of load is a trend, and a new replica takes that long to load anyway.
LOOK_BACK_S = 15.0
UPSCALE_DELAY_S = 10.0
DOWNSCALE_DELAY_S = 120.0  # the default: a replica takes a while to load, so it is not dropped at the first lull
# A local instance's settings (inherited by its processes). On a node whose engine holds every core, whatever Ray
# does meanwhile comes out of the engine's time: one client's tok/s beside an idle Ray instance fell to 0.93-0.96x of
# the same server alone (Zen 3, 2 cores), about as much as a synthetic process that takes the same share of a core.
# These cut Ray's idle CPU from 6.9% to 4.6% of a core (measured with /proc/*/task/*/schedstat, one replica):
# Serve's control loop every 2 s rather than 0.1 s (each pass costs ~4 ms of Python; replicas that die are still
# replaced within seconds), the dashboard agent's node reports every 30 s rather than 2.5 s (for a dashboard a
# local instance does not run), task events every 10 s and Ray's own metrics every 60 s (nothing reads them:
# /metrics reads the replicas' ports), no timing of every event-loop handler, the raylet's resource reports and
# GC checks every second rather than ten times (one node: nothing to balance across), event-loop lag probes every
# minute; and a log monitor that looks for new log files every 5 s rather than globbing the log folder every
# 0.1 s. Measured with the helpers below stopped too: the Ray path's one-client tok/s 1.008x (0.999-1.022) the
# same Ray path without them, 100 rounds.
LOCAL_RAY_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "2", "RAY_USAGE_STATS_ENABLED": "0",
                 "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "LOG_NAME_UPDATE_INTERVAL_S": "5",
                 "REPORTER_UPDATE_INTERVAL_MS": "30000", "RAY_task_events_report_interval_ms": "10000",
                 "RAY_metrics_report_interval_ms": "60000", "RAY_event_stats": "false",
                 "RAY_raylet_report_resources_period_milliseconds": "1000",
                 "RAY_raylet_check_gc_period_milliseconds": "1000",
                 "RAY_io_context_event_loop_lag_collection_interval_ms": "60000"}
# Helpers that `ray.init` starts for a local instance and that serve nobody here (0.8% of a core idle, together):
# the autoscaler's monitor (one machine: no nodes to add), the log monitor (it forwards worker logs to a driver,
# and log_to_driver is off) and the dashboard's API server (no dashboard; usage stats are off). Stopped through
# Ray's own node object, which then leaves them out of ray.shutdown().
LOCAL_IDLE_HELPERS = ("kill_monitor", "kill_log_monitor", "kill_dashboard")


@dataclass(frozen=True)
class RayOptions:
    """Where the replicas run and how many (``replicas``, or ``min_replicas``..``max_replicas`` autoscaled on
    requests in flight per replica)."""

    address: str | None = None  # an existing cluster (``ray start --head`` printed it); None: a local instance
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    replica_cpus: float = 1.0
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_S  # seconds a stopping replica lets its requests finish
    downscale_delay: float | None = None  # seconds of low load before the autoscaler removes one (None: default)

    def check(self) -> None:
        if self.replicas < 1:
            raise InvalidParameterError(f"--replicas {self.replicas}: at least 1")
        if self.downscale_delay is not None and (self.downscale_delay < 0 or self.min_replicas is None):
            raise InvalidParameterError(f"--downscale-delay {self.downscale_delay}: needs --min-replicas and "
                                        "--max-replicas (it applies to autoscaling), and must not be negative")
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
        "ray_actor_options": {"num_cpus": options.replica_cpus, "runtime_env": {"env_vars": REPLICA_ENV}},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        # A removed replica drains its own HTTP requests (see GemmakitReplica.__del__); Serve's drain loop, which
        # waits for Serve calls, has none to wait for.
        "graceful_shutdown_timeout_s": options.shutdown_timeout,
        "graceful_shutdown_wait_loop_s": 0.5,
        # By import path, not the class: Serve would ship a class by value, a copy whose module globals (the
        # router registry the ingress reads) are not the ingress's.
        "request_router_config": RequestRouterConfig(request_router_class=ROUTER_PATH,
                                                     request_routing_stats_period_s=ROUTING_STATS_PERIOD_S),
    }
    if options.min_replicas is None:
        opts["num_replicas"] = options.replicas
    else:  # Serve's autoscaler, on the requests the replicas report in flight: about a replica's rows each
        downscale_delay = DOWNSCALE_DELAY_S if options.downscale_delay is None else options.downscale_delay
        opts["autoscaling_config"] = {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                                      "target_ongoing_requests": max_batch, "look_back_period_s": LOOK_BACK_S,
                                      "upscale_delay_s": UPSCALE_DELAY_S, "downscale_delay_s": downscale_delay,
                                      "policy": {"policy_function": POLICY_PATH}}
    return opts


def start_ray(address: str | None) -> bool:
    """Connect to the cluster at ``address``, or start a local instance with this machine's cores; True when
    this process started Ray (and so stops it at the end)."""
    import ray

    common = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        ray.init(address=address, **common)
        return False
    for name, value in LOCAL_RAY_ENV.items():  # inherited by the processes of the local instance
        os.environ.setdefault(name, value)
    # address="local": a new instance even where `ray start` has run on this machine (ray.init() alone would join
    # the cluster named in /tmp/ray/ray_current_cluster, which outlives a cluster stopped without `ray stop`).
    ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
    stop_idle_helpers()
    return True


def stop_idle_helpers() -> None:
    """Stop the helpers of the local instance this process started that nothing here uses (LOCAL_IDLE_HELPERS).
    Through a private object of Ray's: where a Ray version lacks it, they keep running, which costs only CPU."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    for name in LOCAL_IDLE_HELPERS:
        try:
            getattr(node, name)(check_alive=False)
        except Exception as exc:  # noqa: BLE001  (any failure here leaves a helper running, nothing worse)
            logger.debug("left Ray's %s helper running: %r", name.removeprefix("kill_"), exc)


def start(spec: ReplicaSpec, options: RayOptions, max_batch: int, max_waiting: int) -> Any:
    """Deploy the replicas (Ray must be running) and return the deployment handle once Serve reports them up."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    spec = dataclasses.replace(spec, drain_timeout=drain_timeout_for(options.shutdown_timeout))
    deployment = serve.deployment(GemmakitReplica).options(**deployment_options(options, max_batch, max_waiting))
    return serve.run(deployment.bind(spec), name=APP_NAME, route_prefix=None)


def serve_ingress(handle, host: str, port: int, options, shutdown_timeout: float, started_ray: bool,
                  on_ready: Callable[[str], None] | None = None, after_stop: Callable[[], None] | None = None) -> None:
    """Run the ingress (:class:`~gemmakit.cluster.ingress.IngressOptions` ``options``) on ``host:port`` until
    SIGTERM or Ctrl-C (requests in flight get ``shutdown_timeout`` seconds to finish), then remove the replicas,
    run ``after_stop`` (e.g. close the shared audit log), and stop Ray if this process started it. The ingress
    answers once it knows ``options.replicas`` replicas; ``on_ready`` gets the model id."""
    import ray
    import uvicorn

    from ..server.lifecycle import SignalServer
    from .ingress import create_ingress_app

    app = create_ingress_app(handle, options, on_ready, on_stop=lambda: stop_serve(handle, started_ray))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=int(shutdown_timeout))
    try:
        SignalServer(config).run()
    finally:
        try:
            if after_stop is not None:
                after_stop()
        finally:
            if started_ray:
                ray.shutdown()


async def stop_serve(handle, started_ray: bool) -> None:
    """On the ingress's loop (where the handle's router runs): stop Serve if this process started Ray, else
    delete just this application from the cluster."""
    import asyncio

    from ray import serve

    if started_ray:
        await serve.shutdown_async()
        return
    await handle.shutdown_async()
    await asyncio.to_thread(serve.delete, APP_NAME)


def stop_after_failed_start(started_ray: bool) -> None:
    """Clean up when the replicas never started serving (the ingress never ran)."""
    import ray
    from ray import serve

    try:
        if started_ray:
            serve.shutdown()
    finally:
        if started_ray:
            ray.shutdown()
