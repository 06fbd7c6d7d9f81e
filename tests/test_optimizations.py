"""Optimization jobs end to end: the simulator's `/ws/optimization` → ONE upstream socket → browsers on WS and SSE."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import connect

from tests.conftest import API_KEY, Gateway, Received, Sim, read_sse
from tests.servers import wait_for
from tests.wsclient import Client, ws_client

JOB_TERMINALS = ("job_complete", "job_failed", "job_cancelled")


def contiguous(ids: list[Any]) -> bool:
    return ids == list(range(1, len(ids) + 1))


def job_done(received: Received) -> bool:
    return any(e[1] in JOB_TERMINALS or e[1] == "gateway.close" for e in received.events)


async def _fast_setup(sim_factory: Callable[..., Any], gateway_factory: Callable[..., Any],
                      **gateway_overrides: Any) -> tuple[Sim, Gateway]:
    sim: Sim = await sim_factory(job_interval=0.01, iterations=3)
    gateway: Gateway = await gateway_factory(sim.url, **gateway_overrides)
    return sim, gateway


async def test_many_browsers_on_one_job_share_one_upstream_subscription(
        sim_factory: Callable[..., Any], gateway_factory: Callable[..., Any]) -> None:
    sim, gateway = await _fast_setup(sim_factory, gateway_factory)
    await sim.post("/_sim/configure", {"resource": "optimizations/j-many", "iterations": 4, "interval": 0.02})
    stream = "optimizations/j-many"
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(ws_client(gateway, f"user-{i}")) for i in range(12)]
        for client in clients:
            await client.send(type="subscribe", jobId="j-many")
        for client in clients:
            await client.until(lambda c: c.ended(stream), what="the job to complete")
    first = clients[0].events(stream)
    assert contiguous([e["id"] for e in first]) and first[-1]["eventType"] == "job_complete"
    assert {e["eventType"] for e in first} >= {"job_started", "iteration_start", "mutation_generated",
                                              "evaluation_start", "evaluation_complete", "iteration_complete"}
    for client in clients[1:]:
        assert client.events(stream) == first
    stats = await sim.stats()
    assert stats[stream]["connects"] == 1 and stats[stream]["max_concurrent"] == 1
    assert stats["ws_connections"]["connects"] == 1


async def test_upstream_socket_dropped_mid_job_no_gap_no_duplicate(
        sim_factory: Callable[..., Any], gateway_factory: Callable[..., Any]) -> None:
    sim, gateway = await _fast_setup(sim_factory, gateway_factory)
    stream = "optimizations/j-drop"
    await sim.post("/_sim/configure", {"resource": stream, "iterations": 12, "interval": 0.02})
    async with ws_client(gateway, "a") as a, ws_client(gateway, "b") as b:
        await a.send(type="subscribe", jobId="j-drop")
        await b.send(type="subscribe", jobId="j-drop")
        await a.until(lambda c: len(c.events(stream)) >= 10)
        dropped = await sim.post("/_sim/drop", {"resource": stream})
        assert dropped["dropped"] == 1
        mark = len(a.events(stream))
        await a.until(lambda c: len(c.events(stream)) >= mark + 5 or c.ended(stream), what="events after the drop")
        await sim.post("/_sim/drop", {"resource": stream})
        for client in (a, b):
            await client.until(lambda c: c.ended(stream), what="the job to complete")
    for client in (a, b):
        assert contiguous(client.ids(stream)), client.ids(stream)
        assert client.events(stream)[-1]["eventType"] == "job_complete"
        assert client.errors() == []
    assert a.events(stream) == b.events(stream)
    stats = await sim.stats()
    assert stats["ws_connections"]["connects"] >= 2
    assert stats[stream]["max_concurrent"] == 1
    connects = gateway.app.metrics.registry.get_sample_value(
        "gateway_upstream_connects_total", {"kind": "optimizations", "reason": "error"})
    assert connects is not None and connects >= 1


async def test_after_event_id_resumes_a_job(sim_factory: Callable[..., Any],
                                            gateway_factory: Callable[..., Any]) -> None:
    _, gateway = await _fast_setup(sim_factory, gateway_factory)
    stream = "optimizations/j-resume"
    async with ws_client(gateway) as first:
        await first.send(type="subscribe", jobId="j-resume")
        await first.until(lambda c: c.ended(stream))
    async with ws_client(gateway) as again:
        await again.send(type="subscribe", jobId="j-resume", afterEventId=5)
        await again.until(lambda c: c.ended(stream))
    assert again.events(stream) == first.events(stream)[5:]
    # A browser refreshed after the end still finds the best prompt in the retained history.
    assert any(e["eventType"] == "new_best" for e in first.events(stream))


async def test_sse_and_ws_subscribers_of_one_job_get_the_same_events_and_ids(
        sim_factory: Callable[..., Any], gateway_factory: Callable[..., Any]) -> None:
    sim, gateway = await _fast_setup(sim_factory, gateway_factory)
    await sim.post("/_sim/configure", {"resource": "optimizations/j-both", "iterations": 3, "interval": 0.02})
    stream = "optimizations/j-both"
    async with ws_client(gateway, "ws-user") as client:
        await client.send(type="subscribe", jobId="j-both")
        sse = await read_sse(f"{gateway.url}/api/v1/optimizations/j-both/stream", gateway.headers("sse-user"),
                             until=job_done)
        await client.until(lambda c: c.ended(stream))
    assert sse.status == 200
    ws_events = client.events(stream)
    assert [int(i) for i in sse.ids if i is not None] == [e["id"] for e in ws_events]
    assert [e[1] for e in sse.events] == [e["eventType"] for e in ws_events]
    assert [json.loads(e[2]) for e in sse.events] == ws_events  # SSE data = the upstream event object
    assert (await sim.stats())[stream]["connects"] == 1


async def test_unknown_job_ends_with_upstream_failed_on_both_transports(
        sim_factory: Callable[..., Any], gateway_factory: Callable[..., Any]) -> None:
    _, gateway = await _fast_setup(sim_factory, gateway_factory)
    stream = "optimizations/missing-job"
    async with ws_client(gateway) as client:
        await client.send(type="subscribe", jobId="missing-job")
        await client.until(lambda c: c.ended(stream))
        sse = await read_sse(f"{gateway.url}/api/v1/{stream}/stream", gateway.headers("bob"), until=job_done)
    assert client.errors(stream) == ["upstream_failed"]
    assert client.of_type("error", stream)[0]["error"]["reconnect"] is False
    assert sse.of_type("gateway.close")[0]["code"] == "upstream_failed"


async def test_paused_job_does_not_count_towards_inactivity(
        sim_factory: Callable[..., Any], gateway_factory: Callable[..., Any]) -> None:
    """A paused job waits on a human: its browsers stay subscribed past the inactivity limit and see job_resumed.

    An idle evaluation on the same socket (and over SSE) is the control: once it has been closed for
    inactivity, the paused job's subscriptions have been checked against the same limit and kept.
    """
    sim, gateway = await _fast_setup(sim_factory, gateway_factory,
                                     limits={"inactivity_timeout": 0.4, "heartbeat": 0.1})
    job, idle = "optimizations/j-hold", "evaluations/e-idle"
    await sim.post("/_sim/configure", {"resource": job, "iterations": 40, "interval": 0.05})
    await sim.post("/_sim/configure", {"resource": idle, "rows": 2, "interval": 60})
    async with ws_client(gateway, "ws-user") as client:
        await client.send(type="subscribe", jobId="j-hold")
        await client.until(lambda c: bool(c.events(job)))
        sse_job = Received()
        sse_task = asyncio.create_task(read_sse(f"{gateway.url}/api/v1/{job}/stream", gateway.headers("sse-user"),
                                                until=job_done, received=sse_job, timeout=15))
        await wait_for(lambda: bool(sse_job.events), message="the SSE subscriber to start")
        await sim.post("/_sim/jobs/j-hold/pause")
        await client.until(lambda c: _types(c, job)[-1:] == ["job_paused"], what="job_paused")
        await wait_for(lambda: any(e[1] == "job_paused" for e in sse_job.events), message="job_paused over SSE")
        await client.subscribe(idle)
        sse_idle = await read_sse(f"{gateway.url}/api/v1/{idle}/stream", gateway.headers("sse-user"),
                                  until=lambda r: any(e[1] == "gateway.close" for e in r.events))
        await client.until(lambda c: c.ended(idle), what="the idle control to time out")
        assert client.errors(idle) == ["inactivity_timeout"]
        assert sse_idle.of_type("gateway.close")[0]["code"] == "inactivity_timeout"
        # The paused job outlived the same limit on both transports.
        assert not client.ended(job) and client.errors(job) == []
        assert not sse_task.done() and not any(e[1] == "gateway.close" for e in sse_job.events)
        await sim.post("/_sim/jobs/j-hold/resume")
        await client.until(lambda c: "job_resumed" in _types(c, job), what="job_resumed")
        await sim.post("/_sim/jobs/j-hold/cancel")
        await client.until(lambda c: c.ended(job))
        await sse_task
    assert _types(client, job)[-1] == "job_cancelled"
    assert contiguous(client.ids(job))
    sse_types = [e[1] for e in sse_job.events]
    assert "job_resumed" in sse_types and sse_types[-1] == "job_cancelled"


def _types(client: Client, stream: str) -> list[str]:
    return [e["eventType"] for e in client.events(stream)]



async def test_refused_duplicate_upstream_subscription_is_retried(
        sim_factory: Callable[..., Any], gateway_factory: Callable[..., Any]) -> None:
    """Another holder of the job on the same API key: the gateway backs off and subscribes once it is free."""
    sim, gateway = await _fast_setup(sim_factory, gateway_factory)
    stream = "optimizations/j-held"
    await sim.post("/_sim/configure", {"resource": stream, "iterations": 3, "interval": 0.02})
    upstream_url = sim.url.replace("http://", "ws://", 1) + "/ws/optimization"
    async with connect(upstream_url, additional_headers={"X-API-Key": API_KEY}, open_timeout=5) as holder:
        await holder.send(json.dumps({"type": "subscribe", "jobId": "j-held"}))
        assert json.loads(await holder.recv())["type"] == "subscribed"
        async with ws_client(gateway) as client:
            await client.send(type="subscribe", jobId="j-held")
            await wait_for(lambda: _rejected(sim, stream), message="the gateway's subscribe to be refused")
            await holder.send(json.dumps({"type": "unsubscribe", "jobId": "j-held"}))
            await client.until(lambda c: c.ended(stream), what="the job after the retry")
    assert contiguous(client.ids(stream)) and client.errors() == []
    assert client.events(stream)[-1]["eventType"] == "job_complete"


async def _rejected(sim: Sim, stream: str) -> bool:
    return bool((await sim.resource(stream)).get("rejected"))


async def test_upstream_subscription_and_socket_end_after_linger(
        sim_factory: Callable[..., Any], gateway_factory: Callable[..., Any]) -> None:
    sim, gateway = await _fast_setup(sim_factory, gateway_factory)
    stream = "optimizations/j-linger"
    await sim.post("/_sim/configure", {"resource": stream, "iterations": 200, "interval": 0.05})
    async with ws_client(gateway) as client:
        await client.send(type="subscribe", jobId="j-linger")
        await client.until(lambda c: bool(c.events(stream)))
        await client.send(type="unsubscribe", jobId="j-linger")
        await client.until(lambda c: c.ended(stream))

        async def released() -> bool:
            stats = await sim.stats()
            return bool(stats[stream]["open"] == 0 and stats["ws_connections"]["open"] == 0)

        await wait_for(released, message="the upstream subscription and socket to close after linger")
        await client.send(type="subscribe", jobId="j-linger", afterEventId=client.ids(stream)[-1])
        await client.until(lambda c: len(c.of_type("subscribed", stream)) == 2 and len(c.events(stream)) >= 4)
    assert contiguous(client.ids(stream))
    assert (await sim.stats())["ws_connections"]["connects"] == 2


async def test_upstream_refusing_the_api_key_ends_jobs_without_leaking_it(
        sim_factory: Callable[..., Any], gateway_factory: Callable[..., Any]) -> None:
    sim, _ = await _fast_setup(sim_factory, gateway_factory)
    gateway: Gateway = await gateway_factory(sim.url, upstream={"api_key": "ll_wrong_" + "x" * 20})
    stream = "optimizations/j-denied"
    async with ws_client(gateway) as client:
        await client.send(type="subscribe", jobId="j-denied")
        await client.until(lambda c: c.ended(stream))
    error = client.of_type("error", stream)[0]["error"]
    assert error["code"] == "upstream_failed" and "401" in error["detail"]
    assert "ll_wrong_" not in json.dumps(client.messages)
