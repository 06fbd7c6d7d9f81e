"""Prometheus metrics on real servers: scraped while streams run, the values move as they should."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway import __version__
from tests.conftest import API_KEY, SECRET, Gateway, Received, Sim, read_sse, terminal
from tests.servers import serve, subprocess_server, wait_for

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Series:
    """Every sample of `url` (a /metrics endpoint) keyed by (sample name, labels)."""
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    series: Series = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            series[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return series


def value(series: Series, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and wanted <= ls)


async def metric(gateway: Gateway, name: str, **labels: str) -> float:
    return value(await scrape(f"{gateway.url}/metrics"), name, **labels)


def stream_url(gateway: Gateway, resource: str) -> str:
    return f"{gateway.url}/api/v1/{resource}/stream"


async def test_values_move_while_streams_run(sim: Sim, gateway: Gateway) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/m-run", "rows": 40, "interval": 0.03})
    received = [Received() for _ in range(3)]
    tasks = [asyncio.create_task(read_sse(stream_url(gateway, "evaluations/m-run"), gateway.headers(f"u{i}"),
                                          until=terminal, received=r, timeout=15))
             for i, r in enumerate(received)]

    async def three_open() -> bool:
        return await metric(gateway, "gateway_subscribers", transport="sse", kind="evaluations") == 3

    await wait_for(three_open, message="three open subscribers")
    await wait_for(lambda: all(len(r.events) >= 8 for r in received), message="events flowing")
    live = await scrape(f"{gateway.url}/metrics")
    assert value(live, "gateway_upstream_streams", kind="evaluations") == 1
    assert value(live, "gateway_upstream_connects_total", kind="evaluations", reason="initial") == 1
    assert value(live, "gateway_upstream_events_total", kind="evaluations") >= 8
    assert value(live, "gateway_frames_sent_total", transport="sse") >= 3 * 8
    age = value(live, "gateway_upstream_last_event_age_seconds", kind="evaluations")
    assert 0 <= age < 5
    assert value(live, "gateway_build_info", version=__version__) == 1

    # A forced upstream drop is counted as a reconnect, with its reason; browsers see nothing of it.
    assert (await sim.post("/_sim/drop", {"resource": "evaluations/m-run", "mode": "abort"}))["dropped"] == 1

    async def reconnected() -> bool:
        series = await scrape(f"{gateway.url}/metrics")
        total = value(series, "gateway_upstream_connects_total", kind="evaluations")
        return total - value(series, "gateway_upstream_connects_total", kind="evaluations", reason="initial") == 1

    await wait_for(reconnected, message="one reconnect counted")
    await asyncio.gather(*tasks)
    assert all(r.events[-1][1] == "final" for r in received)
    assert received[0].ids == received[1].ids == received[2].ids

    async def all_closed() -> bool:
        series = await scrape(f"{gateway.url}/metrics")
        return (value(series, "gateway_subscribers", transport="sse", kind="evaluations") == 0
                and value(series, "gateway_upstream_streams", kind="evaluations") == 0)

    await wait_for(all_closed, message="subscribers and upstream streams back to 0")
    done = await scrape(f"{gateway.url}/metrics")
    events = value(done, "gateway_upstream_events_total", kind="evaluations")
    assert events == 2 + 80 + 2  # every upstream event counted once, the drop notwithstanding
    assert value(done, "gateway_frames_sent_total", transport="sse") == 3 * events
    assert value(done, "gateway_fanout_delay_seconds_count") >= 1
    assert value(done, "gateway_upstream_connects_total", kind="evaluations", reason="error") == 1
    # Nothing of the finished stream remains in the age gauge.
    assert value(done, "gateway_upstream_last_event_age_seconds", kind="evaluations") == 0
    assert (await sim.resource("evaluations/m-run"))["connects"] == 2


async def test_closes_are_counted_by_code(sim: Sim, gateway_factory: Any) -> None:
    gateway: Gateway = await gateway_factory(limits={"inactivity_timeout": 0.8})
    # superseded: the same user opens the same stream twice (replace policy).
    await sim.post("/_sim/configure", {"resource": "evaluations/m-sup", "rows": 50, "interval": 0.05})
    first = Received()
    task = asyncio.create_task(read_sse(stream_url(gateway, "evaluations/m-sup"), gateway.headers("carol"),
                                        until=terminal, received=first))
    await wait_for(lambda: len(first.events) >= 2, message="first stream open")
    second = Received()
    task2 = asyncio.create_task(read_sse(stream_url(gateway, "evaluations/m-sup"), gateway.headers("carol"),
                                         until=lambda r: len(r.events) >= 1, received=second))
    await task
    await task2
    assert json.loads(first.events[-1][2])["code"] == "superseded"
    # inactivity_timeout: nothing happens upstream for longer than the limit.
    await sim.post("/_sim/configure", {"resource": "evaluations/m-idle", "rows": 2, "interval": 5})
    idle = await read_sse(stream_url(gateway, "evaluations/m-idle"), gateway.headers(), until=terminal)
    assert json.loads(idle.events[-1][2])["code"] == "inactivity_timeout"
    # upstream_failed: the upstream does not know the evaluation.
    missing = await read_sse(stream_url(gateway, "evaluations/missing-m"), gateway.headers(), until=terminal)
    assert json.loads(missing.events[-1][2])["code"] == "upstream_failed"

    series = await scrape(f"{gateway.url}/metrics")
    assert value(series, "gateway_closes_total", code="superseded") == 1
    assert value(series, "gateway_closes_total", code="inactivity_timeout") == 1
    assert value(series, "gateway_closes_total", code="upstream_failed") == 1
    assert value(series, "gateway_closes_total") == 3  # normal ends (final, client gone) are not gateway closes


async def test_auth_failures_and_limit_rejections_by_reason(sim: Sim, gateway_factory: Any) -> None:
    gateway: Gateway = await gateway_factory(limits={"one_stream_per_consumer": "reject"})
    url = stream_url(gateway, "evaluations/m-auth")
    async with httpx.AsyncClient() as client:
        assert (await client.get(url)).status_code == 401
        assert (await client.get(url, headers=gateway.headers(ttl=-120))).status_code == 401
        tampered = gateway.token()[:-4] + "AAAA"
        assert (await client.get(url, headers={"Authorization": f"Bearer {tampered}"})).status_code == 401
        forbidden = gateway.headers(streams=["evaluations/other-*"])
        assert (await client.get(url, headers=forbidden)).status_code == 403
    await sim.post("/_sim/configure", {"resource": "evaluations/m-auth", "rows": 30, "interval": 0.05})
    holder = Received()
    task = asyncio.create_task(read_sse(url, gateway.headers("dave"), until=terminal, received=holder))
    await wait_for(lambda: len(holder.events) >= 1, message="first stream open")
    async with httpx.AsyncClient() as client:
        assert (await client.get(url, headers=gateway.headers("dave"))).status_code == 409
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    series = await scrape(f"{gateway.url}/metrics")
    assert value(series, "gateway_auth_failures_total", reason="missing_token") == 1
    assert value(series, "gateway_auth_failures_total", reason="expired") == 1
    assert value(series, "gateway_auth_failures_total", reason="bad_signature") == 1
    assert value(series, "gateway_auth_failures_total", reason="forbidden") == 1
    assert value(series, "gateway_limit_rejections_total", limit="one_stream_per_consumer") == 1


async def test_polls_replays_and_coalescing(sim: Sim, gateway: Gateway) -> None:
    headers = gateway.headers()
    async with httpx.AsyncClient() as client:
        answers = await asyncio.gather(*(client.get(f"{gateway.url}/api/v1/evaluations/m-poll", headers=headers)
                                         for _ in range(10)))
    assert {a.status_code for a in answers} == {200}
    url = stream_url(gateway, "evaluations/m-replay")
    first = await read_sse(url, headers, until=terminal)
    resumed = await read_sse(url, {**headers, "Last-Event-ID": first.ids[3] or ""}, until=terminal)
    assert resumed.ids == first.ids[4:]
    lost = await read_sse(url, {**headers, "Last-Event-ID": "not-an-id"}, until=terminal)
    assert lost.events[0][1] == "gateway.continuity_lost"
    series = await scrape(f"{gateway.url}/metrics")
    assert value(series, "gateway_poll_requests_total", outcome="upstream") == 1
    assert value(series, "gateway_poll_requests_total", outcome="coalesced") + value(
        series, "gateway_poll_requests_total", outcome="cached") == 9
    assert value(series, "gateway_replay_requests_total", outcome="hit") == 1
    assert value(series, "gateway_replay_requests_total", outcome="continuity_lost") == 1
    assert (await sim.resource("evaluations/m-poll"))["polls"] == 1


async def test_label_cardinality_does_not_grow_with_evaluations(sim: Sim, gateway: Gateway) -> None:
    ids = [f"card-{i:03d}" for i in range(50)]
    for resource_id in ids:
        await sim.post("/_sim/configure", {"resource": f"evaluations/{resource_id}", "rows": 2, "interval": 0.005})

    async def watch(batch: list[str]) -> None:
        async def one(resource_id: str) -> None:
            got = await read_sse(stream_url(gateway, f"evaluations/{resource_id}"), gateway.headers(resource_id),
                                 until=terminal)
            assert got.events[-1][1] == "final"
            async with httpx.AsyncClient() as client:
                response = await client.get(f"{gateway.url}/api/v1/evaluations/{resource_id}",
                                            headers=gateway.headers(resource_id))
                assert response.status_code == 200

        await asyncio.gather(*(one(r) for r in batch))

    async def quiet() -> bool:
        return await metric(gateway, "gateway_upstream_streams") == 0

    await watch(ids[:5])
    await wait_for(quiet, message="first streams ended")
    after_five = await scrape(f"{gateway.url}/metrics")
    for start in range(5, 50, 15):
        await watch(ids[start:start + 15])
    await wait_for(quiet, message="all streams ended")
    after_fifty = await scrape(f"{gateway.url}/metrics")

    assert value(after_fifty, "gateway_upstream_events_total", kind="evaluations") == 50 * 8
    # Same series (names and label sets) after 50 evaluations as after 5: ids never become labels.
    assert set(after_fifty) == set(after_five)
    label_values = {v for (_, labels) in after_fifty for _, v in labels}
    assert not any("card-" in v for v in label_values)
    assert len(after_fifty) < 200


async def test_separate_metrics_listener(sim: Sim, gateway_factory: Any) -> None:
    gateway: Gateway = await gateway_factory(metrics={"port": 0})
    assert gateway.app.metrics_app is not None
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{gateway.url}/metrics")).status_code == 404
    async with serve(gateway.app.metrics_app) as metrics_url:
        await read_sse(stream_url(gateway, "evaluations/m-sep"), gateway.headers(), until=terminal)
        series = await scrape(f"{metrics_url}/metrics")
        assert value(series, "gateway_upstream_events_total", kind="evaluations") == 2 + 20 + 2
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{metrics_url}/")).status_code == 404
            assert (await client.post(f"{metrics_url}/metrics")).status_code == 405


async def test_metrics_disabled(sim: Sim, gateway_factory: Any) -> None:
    gateway: Gateway = await gateway_factory(metrics={"enabled": False})
    assert gateway.app.metrics_app is None
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{gateway.url}/metrics")).status_code == 404


async def test_gateway_serve_runs_the_metrics_port(sim: Sim, tmp_path: Path) -> None:
    config = {
        "server": {"host": "127.0.0.1", "port": 0},
        "upstream": {"base_url": sim.url, "api_key": "${STRATIX_API_KEY}"},
        "auth": {"jwt": {"algorithms": ["HS256"], "secret": "${GATEWAY_JWT_SECRET}"}},
        "metrics": {"port": 0},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"STRATIX_API_KEY": API_KEY, "GATEWAY_JWT_SECRET": SECRET}
    with subprocess_server(["serve", "--config", str(path)], env=env) as (_, ports):
        port, metrics_port = ports["port"], ports["metrics_port"]
        assert metrics_port not in (None, port)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/metrics")).status_code == 404
            assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
        series = await scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert value(series, "gateway_build_info", version=__version__) == 1


async def test_deferred_count_reports_one_iterations_increments_at_once() -> None:
    from prometheus_client import CollectorRegistry, Counter

    from gateway.metrics import DeferredCount

    registry = CollectorRegistry()
    counter = Counter("frames", "frames", registry=registry)
    deferred = DeferredCount(counter)
    deferred.add(2)
    deferred.add(3)
    assert registry.get_sample_value("frames_total") == 0
    await asyncio.sleep(0)  # one loop iteration: the report was scheduled with call_soon
    assert registry.get_sample_value("frames_total") == 5
    deferred.add(1)
    await asyncio.sleep(0)
    assert registry.get_sample_value("frames_total") == 6


async def test_deliveries_count_frames_and_sample_the_fanout_delay() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from gateway.codec.events import Event
    from gateway.metrics import Deliveries

    registry = CollectorRegistry()
    now = [100.0]
    deliveries = Deliveries(Counter("frames", "frames", registry=registry),
                            Histogram("delay", "delay", registry=registry), lambda: now[0])
    batch = [Event("evaluations/e-1", str(i), "update", "{}", 99.5) for i in (1, 2)]
    deliveries.delivered(3, batch)  # one topic pass wrote to three subscribers: always sampled
    assert registry.get_sample_value("delay_count") == 1
    assert registry.get_sample_value("delay_sum") == 0.5
    for _ in range(Deliveries.SAMPLE_EVERY):  # own writes: one sample per SAMPLE_EVERY
        deliveries.delivered(1, batch[:1])
    assert registry.get_sample_value("delay_count") == 2
    deliveries.count(1, 1, 99.0)
    await asyncio.sleep(0)  # frames are reported once per loop iteration
    assert registry.get_sample_value("frames_total") == 3 * 2 + Deliveries.SAMPLE_EVERY + 1
