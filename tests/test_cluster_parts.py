"""Parts of gemmakit serve --ray that need no running Ray: the autoscaling policy on the replicas' reported load,
the deployment's autoscaling options as Serve reads them, and the ingress's relay (event streams cut between
events, a stream moved to another replica, cookies) in front of stand-in replicas."""

from __future__ import annotations

import asyncio
import json
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

    async def collect() -> list[bytes]:
        return [chunk async for chunk in whole_events(reads())]

    assert asyncio.run(collect()) == [b'data: {"a": 1}\n\ndata: {"b": 2}\n\n', b"data: [DONE]\n\n"]


def _upstream(events: list[bytes], then_fail: bool):
    """A replica's stand-in: an event stream's head at once, then ``events``; then it ends the stream, or (with
    ``then_fail``) drops the connection mid-stream, as a replica that dies does."""

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            return
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        if then_fail:
            raise RuntimeError("the replica died")  # uvicorn closes the connection: the chunked body is cut
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


class _Replicas:
    """A router stand-in (gemmakit.cluster.registry reads the replicas' URLs from it), in place while in use."""

    def __init__(self, urls: dict[str, str]) -> None:
        self.urls = urls

    def replica_stats(self) -> dict[str, dict]:
        return {replica: {"url": url} for replica, url in self.urls.items()}

    def __enter__(self) -> "_Replicas":
        from gemmakit.cluster import registry

        self.saved = list(registry.ROUTERS)
        registry.ROUTERS.clear()
        registry.ROUTERS.add(self)
        return self

    def __exit__(self, *exc) -> None:
        from gemmakit.cluster import registry

        registry.ROUTERS.clear()
        for router in self.saved:
            registry.ROUTERS.add(router)


def _relay_alone():
    """The ingress's relay (behind the server's gates), without Ray: it reads the replicas from the registry."""
    from gemmakit.cluster.ingress import IngressOptions, gated
    from gemmakit.cluster.metrics import IngressMetrics
    from gemmakit.cluster.proxy import replica_client
    from gemmakit.cluster.relay import IngressState, forward

    state = IngressState(handle=None, metrics=IngressMetrics(), keys=[])

    async def relay(scope, receive, send) -> None:
        if scope["type"] == "http":
            await forward(state, scope, receive, send)
            return
        while (await receive())["type"] != "lifespan.shutdown":  # the pool lives on the server's loop
            state.client = replica_client()
            await send({"type": "lifespan.startup.complete"})
        await state.client.close()
        await send({"type": "lifespan.shutdown.complete"})

    return state, gated(relay, state, IngressOptions())


def test_a_stream_whose_replica_dies_before_its_first_event_continues_on_another():
    """The head of a stream reaches the client at once (as from the single server); the events come from the
    replica that gives them: one that fails before its first event is replaced, one that fails later ends the
    stream with an error event."""
    pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'gemmakit[ray]'")
    import httpx
    from serving import Server

    events = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]
    state, relay = _relay_alone()
    with Server(_upstream([], then_fail=True)) as dying, Server(_upstream(events, then_fail=False)) as healthy, \
            Server(_upstream(events[:1], then_fail=True)) as cut, Server(relay) as ingress:
        # No affinity key on this path: the least busy replica, the first listed when none is busy.
        with _Replicas({"dying": dying.url, "healthy": healthy.url}):
            answer = httpx.post(ingress.url + "/stream", json={})
        with _Replicas({"cut": cut.url, "healthy": healthy.url}):
            cut_answer = httpx.post(ingress.url + "/stream", json={})
        with _Replicas({"dying": dying.url}):
            alone = httpx.post(ingress.url + "/stream", json={})
    assert answer.status_code == 200 and answer.headers["x-gemmakit-replica"] == "dying"
    assert answer.content == b": retried on replica healthy\n\n" + b"".join(events)
    # Sent again: the first stream once; the lone replica's twice, in vain (3 sends in all for one replica).
    assert state.metrics.retries._value.get() == 1 + 2
    # An event reached the client before its replica failed: too late for another replica.
    assert cut_answer.content.startswith(events[0] + b'data: {"error": ')
    for failed in (cut_answer, alone):
        error = json.loads(failed.text.split("\n\n")[-3].removeprefix("data: "))["error"]
        assert error["code"] == "replica_failed" and failed.text.endswith("data: [DONE]\n\n")
    assert sum(state.in_flight.values()) == 0  # every try's count ended


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
