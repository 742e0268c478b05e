"""Serve's autoscaling policy for gemmakit replicas: replicas wanted from the requests the replicas report.

Requests reach a replica over HTTP, not as Serve calls, so Serve's own count of ongoing requests (what its default
policy scales on) stays at zero. Each replica reports instead the requests running or waiting in its engine
(:meth:`gemmakit.cluster.replica.GemmakitReplica.record_autoscaling_stats`, averaged by Serve over the
deployment's ``look_back_period_s``); this policy asks for as many replicas as that total needs at
``target_ongoing_requests`` each. Serve applies the rest of the deployment's autoscaling config to the answer:
``min_replicas``/``max_replicas``, ``upscale_delay_s``/``downscale_delay_s``, the scaling factors.

Serve imports the policy by its path (``gemmakit.cluster.autoscale:in_flight_policy``) in its controller.
"""

from __future__ import annotations

from typing import Any

from .replica import IN_FLIGHT_METRIC

POLICY_PATH = f"{__name__}:in_flight_policy"


def in_flight_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Replicas wanted (a fraction; Serve rounds it and bounds it) for ``ctx`` (a ``ray.serve.config
    .AutoscalingContext``), and the policy's state (none)."""
    if ctx.current_num_replicas == 0:  # nothing reports yet: keep what Serve is already starting
        return ctx.target_num_replicas, {}
    reported = (ctx.aggregated_metrics or {}).get(IN_FLIGHT_METRIC, {})
    # A replica that has not reported yet (just started) counts as idle.
    return sum(reported.values()) / ctx.config.get_target_ongoing_requests(), {}
