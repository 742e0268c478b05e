"""Parts of gemmakit serve --ray that need no running Ray: the autoscaling policy on the replicas' reported load,
the deployment's autoscaling options as Serve reads them, and the ingress's cutting of relayed event streams."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from gemmakit.errors import InvalidParameterError


def _context(current: int, reported: dict[str, float] | None, target: float = 4.0, wanted: int = 1):
    from ray.serve.config import AutoscalingConfig

    config = AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=target)
    metrics = None if reported is None else {"in_flight": reported}
    return SimpleNamespace(current_num_replicas=current, target_num_replicas=wanted, aggregated_metrics=metrics,
                           config=config)


def test_the_policy_asks_for_the_replicas_that_the_reported_load_needs():
    pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'gemmakit[ray]'")
    from gemmakit.cluster.autoscale import in_flight_policy

    assert in_flight_policy(_context(2, {"a": 6.0, "b": 5.0}))[0] == pytest.approx(11 / 4)
    assert in_flight_policy(_context(2, {"a": 1.0, "b": 0.0}))[0] == pytest.approx(0.25)
    # Replicas that have not reported yet count as idle; so does a deployment none has reported for.
    assert in_flight_policy(_context(3, {"a": 8.0}))[0] == pytest.approx(2.0)
    assert in_flight_policy(_context(1, None))[0] == 0.0
    # Before any replica runs, Serve's own target stands.
    assert in_flight_policy(_context(0, None, wanted=2))[0] == 2


def test_an_autoscaled_deployment_scales_on_the_replicas_reported_load():
    pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'gemmakit[ray]'")
    from ray.serve.config import AutoscalingConfig

    from gemmakit.cluster.autoscale import in_flight_policy
    from gemmakit.cluster.launch import RayOptions, deployment_options

    options = deployment_options(RayOptions(min_replicas=1, max_replicas=3, downscale_delay=5.0), 4, 16)
    config = AutoscalingConfig(**options["autoscaling_config"])  # as Serve reads it
    assert (config.min_replicas, config.max_replicas, config.target_ongoing_requests) == (1, 3, 4)
    assert config.downscale_delay_s == 5.0
    policy = config.policy.get_policy()  # what Serve's controller runs (it ships the function by value)
    assert (policy.__module__, policy.__qualname__) == (in_flight_policy.__module__, in_flight_policy.__qualname__)
    assert policy(_context(2, {"a": 6.0, "b": 5.0}))[0] == pytest.approx(11 / 4)
    assert "autoscaling_config" not in deployment_options(RayOptions(replicas=2), 4, 16)


def test_a_downscale_delay_without_autoscaling_is_refused():
    pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'gemmakit[ray]'")
    from gemmakit.cluster.launch import RayOptions

    with pytest.raises(InvalidParameterError, match="--downscale-delay"):
        RayOptions(replicas=2, downscale_delay=30.0).check()
    with pytest.raises(InvalidParameterError, match="--downscale-delay"):
        RayOptions(min_replicas=1, max_replicas=2, downscale_delay=-1.0).check()
    RayOptions(min_replicas=1, max_replicas=2, downscale_delay=0.0).check()


def test_a_relayed_event_stream_is_cut_between_events_only():
    pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'gemmakit[ray]'")
    from gemmakit.cluster.relay import whole_events

    async def reads():
        for chunk in (b'data: {"a": ', b'1}\n\ndata: {"b": 2}\n\nda', b"ta: [DONE]\n\n"):
            yield chunk

    async def collect(first: list[bytes]) -> list[bytes]:
        return [chunk async for chunk in whole_events(reads(), first)]

    assert asyncio.run(collect([])) == [b'data: {"a": 1}\n\ndata: {"b": 2}\n\n', b"data: [DONE]\n\n"]
    # The first read (taken before the client is answered) goes through the same cutting.
    assert asyncio.run(collect([b": opening\n\n"])) == [b": opening\n\n", b'data: {"a": 1}\n\ndata: {"b": 2}\n\n',
                                                       b"data: [DONE]\n\n"]


async def _cookie_setter(scope, receive, send) -> None:
    """An upstream that sets a cookie and echoes the Cookie header it was sent."""
    if scope["type"] != "http":  # lifespan
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        return
    cookie = dict(scope["headers"]).get(b"cookie", b"")
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"set-cookie", b"session=client-a; Path=/")]})
    await send({"type": "http.response.body", "body": cookie})


def test_the_relay_never_carries_one_clients_cookie_to_another():
    pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'gemmakit[ray]'")
    from serving import Server

    from gemmakit.cluster.proxy import ForwardedRequest, replica_client, send

    async def two_clients(url: str) -> list[tuple[bytes, bytes | None]]:
        client = replica_client()  # the ingress's pool, shared by all its clients
        try:
            answers = []
            for _ in range(2):
                answer = await send(client, url, ForwardedRequest("GET", "/", b"", (), b""))
                answers.append((b"".join(answer.chunks), answer.head.header(b"set-cookie")))
                await answer.close()
            return answers
        finally:
            await client.close()

    with Server(_cookie_setter) as upstream:
        # By name: aiohttp's default jar refuses cookies from an IP address, not from a named host.
        (first, set_cookie), (second, _) = asyncio.run(two_clients(f"http://localhost:{upstream.port}"))
    assert set_cookie == b"session=client-a; Path=/"  # relayed to the client it was meant for
    assert (first, second) == (b"", b"")  # and never sent on with the next client's request
