"""Redis as a highly available engine (issue 16): stalls and empty restarts survived, readiness that tolerates
a blip, Sentinel failover and Redis Cluster, and a footprint that does not grow with the streams.

Every scenario runs real `gateway serve` replicas against real `redis-server` processes, with browsers
on every replica. The simulator counts the upstream connections of each resource: `max_concurrent`
must stay 1 (the upstream allows one stream per resource per API key).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.conftest import Received, Sim, read_sse, terminal
from tests.proxy import tcp_proxy
from tests.redis_servers import LEASE_TTL, ClusterSet, RedisServer, Replica, SentinelSet, follow, replicas, token
from tests.servers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.requires("redis-server"), pytest.mark.timeout(60)]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def expected(events: int) -> list[str]:
    """The simulator's ids for an evaluation of `events / 2 - 2` rows: every id from 1 to the last."""
    return [str(i) for i in range(1, events + 1)]


async def _everyone(nodes: list[Replica], path: str, count: int) -> tuple[list[Received], list[asyncio.Task[None]]]:
    received = [Received() for _ in range(count)]
    tasks = [asyncio.create_task(follow([nodes[i % len(nodes)].url, nodes[(i + 1) % len(nodes)].url], path, f"u{i}",
                                        received[i], deadline=40)) for i in range(count)]
    await wait_for(lambda: all(len(r.ids) >= 5 for r in received), message="every browser streaming")
    return received, tasks


async def _holder(nodes: list[Replica]) -> Replica:
    async def one() -> bool:
        return sum([await n.metric("gateway_leases_held") for n in nodes]) == 1

    await wait_for(one, message="one holder")
    return next(iter([n for n in nodes if await n.metric("gateway_leases_held") == 1]))


async def test_a_redis_stall_longer_than_the_lease_never_opens_a_second_upstream_stream(
        tmp_path: Path, sim: Sim, redis_server: RedisServer) -> None:
    """The measured bug: Redis frozen for 6 s while a stream is watched through two replicas."""
    await sim.post("/_sim/configure", {"resource": "evaluations/e-stall", "rows": 100, "interval": 0.04})
    async with replicas(tmp_path, sim, redis_server, count=2) as nodes:
        received, tasks = await _everyone(nodes, "/api/v1/evaluations/e-stall/stream", 4)
        await _holder(nodes)
        redis_server.pause()
        try:
            await asyncio.sleep(4 * LEASE_TTL)  # the stall itself (the fault under test), not a synchronisation
            assert all([await n.ready() for n in nodes])  # shorter than broker.unready_after
        finally:
            redis_server.resume()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=40)
    del results
    for r in received:
        assert r.ids == expected(len(r.ids)) and r.events[-1][1] == "final", r.ids
    assert len({len(r.ids) for r in received}) == 1
    stats = await sim.resource("evaluations/e-stall")
    # The upstream never saw a second stream: none open at once, and none refused as already open (409).
    assert stats["max_concurrent"] == 1 and stats["rejected"] == 0, stats


async def test_a_holder_cut_off_from_redis_stops_its_feed_before_anyone_else_can_start_one(
        tmp_path: Path, sim: Sim, redis_server: RedisServer) -> None:
    """A network partition of the holder alone: the others can take the lease, so it must stop first."""
    await sim.post("/_sim/configure", {"resource": "evaluations/e-part", "rows": 100, "interval": 0.04})
    path = "/api/v1/evaluations/e-part/stream"
    async with tcp_proxy(redis_server.url.replace("redis://", "http://").removesuffix("/0")) as (proxy, _):
        behind = {"url": f"redis://127.0.0.1:{proxy.port}/0"}
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        async with replicas(tmp_path / "a", sim, None, count=1, broker=behind) as (holder,):
            first = Received()
            first_task = asyncio.create_task(follow([holder.url], path, "on-holder", first, deadline=40))
            await wait_for(lambda: len(first.ids) >= 3, message="the holder streaming")
            assert await holder.metric("gateway_leases_held") == 1
            async with replicas(tmp_path / "b", sim, redis_server, count=1) as (other,):
                second = Received()
                second_task = asyncio.create_task(follow([other.url], path, "on-other", second, deadline=40))
                await wait_for(lambda: len(second.ids) >= 3, message="the other replica streaming")
                proxy.partition()
                await wait_for(lambda: _holds(other), timeout=20, message="the other replica taking the lease")
                await asyncio.sleep(LEASE_TTL)  # the partition goes on (the fault under test)
                proxy.heal()
                await asyncio.wait_for(asyncio.gather(first_task, second_task), timeout=40)
    for r in (first, second):
        assert r.ids == expected(len(r.ids)) and r.events[-1][1] == "final", r.ids
    stats = await sim.resource("evaluations/e-part")
    assert stats["max_concurrent"] == 1 and stats["rejected"] == 0, stats


async def _holds(node: Replica) -> bool:
    return await node.metric("gateway_leases_held") == 1


async def test_an_empty_restart_longer_than_the_lease_loses_nothing(tmp_path: Path, sim: Sim,
                                                                    redis_server: RedisServer) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-empty", "rows": 100, "interval": 0.04})
    async with replicas(tmp_path, sim, redis_server, count=2) as nodes:
        received, tasks = await _everyone(nodes, "/api/v1/evaluations/e-empty/stream", 4)
        redis_server.stop()  # killed: it comes back with nothing
        await asyncio.sleep(4 * LEASE_TTL)  # the outage itself (the fault under test)
        redis_server.start()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=40)
    for r in received:
        assert r.ids == expected(len(r.ids)) and r.events[-1][1] == "final", r.ids
    assert len({len(r.ids) for r in received}) == 1
    stats = await sim.resource("evaluations/e-empty")
    assert stats["max_concurrent"] == 1 and stats["rejected"] == 0, stats


async def test_readiness_tolerates_a_blip_and_reports_an_outage(tmp_path: Path, sim: Sim,
                                                                redis_server: RedisServer) -> None:
    async with replicas(tmp_path, sim, redis_server, count=1, broker={"unready_after": 1.5}) as (node,):
        await wait_for(node.ready, message="ready")
        assert (await node.health())["broker"]["state"] == "up"
        assert await node.metric("gateway_broker_up") == 1
        redis_server.stop()

        async def down() -> bool:
            return bool((await node.health())["broker"]["state"] == "down")

        await wait_for(down, message="Redis seen down")
        assert await node.ready()  # a blip: still in the load balancer
        assert await node.metric("gateway_broker_up") == 0

        async def not_ready() -> bool:
            return not await node.ready()

        await wait_for(not_ready, message="unready after broker.unready_after")
        assert await node.metric("gateway_broker_unavailable_seconds") >= 1.5
        redis_server.start()
        await wait_for(node.ready, message="ready again once Redis answers")
        assert await node.metric("gateway_broker_up") == 1


async def test_new_browsers_during_an_outage_are_served_once_redis_is_back(tmp_path: Path, sim: Sim,
                                                                           redis_server: RedisServer) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-late", "rows": 20, "interval": 0.02})
    async with replicas(tmp_path, sim, redis_server, count=1) as (node,):
        redis_server.stop()
        latecomer = asyncio.create_task(read_sse(f"{node.url}/api/v1/evaluations/e-late/stream", token("late"),
                                                 until=terminal, timeout=30))
        await asyncio.sleep(2 * LEASE_TTL)  # the outage (the fault under test)
        assert not latecomer.done()  # admitted, waiting for events: none may be delivered without the broker
        redis_server.start()
        got = await asyncio.wait_for(latecomer, timeout=30)
    assert got.status == 200 and got.ids == expected(len(got.ids)) and got.events[-1][1] == "final"
    assert (await sim.resource("evaluations/e-late"))["max_concurrent"] == 1


async def test_redis_connections_do_not_grow_with_the_streams(tmp_path: Path, sim: Sim,
                                                              redis_server: RedisServer) -> None:
    for i in range(60):
        await sim.post("/_sim/configure", {"resource": f"evaluations/c{i}", "rows": 400, "interval": 0.2})
    async with replicas(tmp_path, sim, redis_server, count=1, broker={"max_connections": 8}) as (node,):
        received = [Received() for _ in range(60)]
        tasks = [asyncio.create_task(read_sse(f"{node.url}/api/v1/evaluations/c{i}/stream", token(f"c{i}"),
                                              received=received[i], until=terminal, timeout=30)) for i in range(60)]
        try:
            await wait_for(lambda: all(len(r.ids) >= 2 for r in received), timeout=20, message="60 streams live")
            client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
            try:
                clients = await client.client_list()
            finally:
                await client.aclose()
            # The replica's pool (8) and its one pub/sub connection; the list includes this test's own.
            assert len(clients) - 1 <= 8 + 1, len(clients)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_sentinel_failover_in_the_middle_of_streams_loses_nothing(tmp_path: Path, sim: Sim) -> None:
    sentinels = SentinelSet(tmp_path)
    sentinels.start()
    try:
        await sim.post("/_sim/configure", {"resource": "evaluations/e-sent", "rows": 120, "interval": 0.04})
        broker: dict[str, Any] = {"sentinels": sentinels.addresses, "sentinel_master": SentinelSet.NAME}
        async with replicas(tmp_path, sim, None, count=2, broker=broker) as nodes:
            received, tasks = await _everyone(nodes, "/api/v1/evaluations/e-sent/stream", 4)
            first_master = sentinels.master_port()
            sentinels.failover()
            await wait_for(lambda: sentinels.master_port() != first_master, timeout=20,
                           message="the sentinels to promote the replica")
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=40)
        for r in received:
            assert r.ids == expected(len(r.ids)) and r.events[-1][1] == "final", r.ids
        stats = await sim.resource("evaluations/e-sent")
        assert stats["max_concurrent"] == 1 and stats["rejected"] == 0, stats
    finally:
        sentinels.stop()


async def test_a_redis_cluster_serves_streams_and_a_killed_holder_is_taken_over(tmp_path: Path, sim: Sim) -> None:
    cluster = ClusterSet(tmp_path)
    cluster.start()
    try:
        resources = [f"evaluations/e-cl{i}" for i in range(4)]  # spread over the cluster's slots
        for resource in resources:
            await sim.post("/_sim/configure", {"resource": resource, "rows": 80, "interval": 0.04})
        broker: dict[str, Any] = {"url": cluster.url, "cluster": True}
        async with replicas(tmp_path, sim, None, count=2, broker=broker) as nodes:
            received = [Received() for _ in resources for _ in range(2)]
            tasks = [asyncio.create_task(follow([nodes[j].url, nodes[1 - j].url], f"/api/v1/{resource}/stream",
                                                f"u{i}{j}", received[2 * i + j], deadline=40))
                     for i, resource in enumerate(resources) for j in range(2)]
            await wait_for(lambda: all(len(r.ids) >= 5 for r in received), message="every stream flowing")
            holder = await _some_holder(nodes)
            holder.proc.kill()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=40)
        for r in received:
            assert r.ids == expected(len(r.ids)) and r.events[-1][1] == "final", r.ids
        for resource in resources:
            stats = await sim.resource(resource)
            assert stats["max_concurrent"] == 1 and stats["rejected"] == 0, stats
    finally:
        cluster.stop()


async def _some_holder(nodes: list[Replica]) -> Replica:
    for node in nodes:
        if await node.metric("gateway_leases_held") >= 1:
            return node
    raise AssertionError("no replica holds a lease")
