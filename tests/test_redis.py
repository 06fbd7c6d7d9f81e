"""Several gateway replicas on a real Redis: one upstream stream per resource, failover, no gap.

Each test starts its own `redis-server` on a free loopback port and real `gateway serve`
processes; the simulator runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.auth.tokens import mint_token
from gateway.broker.redis.keys import Keys
from tests.conftest import SECRET, Received, Sim, read_sse, terminal
from tests.redis_servers import LEASE_TTL, RedisServer, Replica, follow, replicas, token
from tests.servers import serve, wait_for
from tests.test_security import Webhook
from tests.wsclient import Client, protocols, recording_client

pytestmark = [pytest.mark.slow, pytest.mark.requires("redis-server")]

#: The keys of the replicas' `key_prefix: "t:"`.
KEYS = Keys("t:")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


async def test_replicas_share_one_upstream_stream(tmp_path: Path, sim: Sim, redis_server: RedisServer) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-rs", "rows": 20, "interval": 0.03})
    async with replicas(tmp_path, sim, redis_server) as nodes:
        path = "/api/v1/evaluations/e-rs/stream"
        results = await asyncio.gather(*[
            read_sse(nodes[i % 3].url + path, token(f"user-{i}"), until=terminal, timeout=15) for i in range(9)])
        expected = [str(i) for i in range(1, 45)]
        for result in results:
            assert result.ids == expected
        stats = await sim.resource("evaluations/e-rs")
        assert stats["connects"] == 1 and stats["max_concurrent"] == 1


async def test_holder_killed_another_replica_takes_over(tmp_path: Path, sim: Sim,
                                                        redis_server: RedisServer) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-fo", "rows": 60, "interval": 0.05})
    async with replicas(tmp_path, sim, redis_server) as nodes:
        path = "/api/v1/evaluations/e-fo/stream"
        received = [Received() for _ in range(6)]
        order = [[n.url for n in nodes[i % 3:] + nodes[:i % 3]] for i in range(6)]
        tasks = [asyncio.create_task(follow(order[i], path, f"user-{i}", received[i])) for i in range(6)]
        await wait_for(lambda: all(len(r.events) >= 20 for r in received), timeout=10, message="streams flowing")
        holders = [n for n in nodes if await n.metric("gateway_leases_held") == 1]
        assert len(holders) == 1
        holder = holders[0]
        killed_at = time.monotonic()
        holder.proc.send_signal(signal.SIGKILL)
        others = [n for n in nodes if n is not holder]
        taken_over = 0.0

        async def took_over() -> bool:
            nonlocal taken_over
            for node in others:
                if await node.metric("gateway_leases_held") == 1:
                    taken_over = time.monotonic() - killed_at
                    return True
            return False

        # Takeover is bounded by the lease TTL plus a renewal interval; the deadline leaves a loaded CI machine
        # room (the upstream's own one-stream rule is checked below: never two streams at once).
        await wait_for(took_over, timeout=LEASE_TTL * 6, message="lease takeover")
        assert taken_over > 0
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)
        expected = [str(i) for i in range(1, 2 + 120 + 3)]
        for r in received:
            assert r.ids == expected
        stats = await sim.resource("evaluations/e-fo")
        assert stats["max_concurrent"] == 1
        assert await others[0].metric("gateway_lease_takeovers_total") + \
            await others[1].metric("gateway_lease_takeovers_total") == 1


async def test_consumer_superseded_across_replicas(tmp_path: Path, sim: Sim, redis_server: RedisServer) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-sup", "rows": 100, "interval": 0.05})
    async with replicas(tmp_path, sim, redis_server, count=2) as nodes:
        path = "/api/v1/evaluations/e-sup/stream"
        first = Received()
        task = asyncio.create_task(read_sse(nodes[0].url + path, token("alice"), received=first, until=terminal,
                                            timeout=15))
        await wait_for(lambda: len(first.events) >= 3, message="first stream")
        second = await read_sse(nodes[1].url + path, token("alice"), until=lambda r: len(r.events) >= 3)
        assert second.status == 200
        await asyncio.wait_for(task, timeout=5)
        assert first.events[-1][1] == "gateway.close"
        assert json.loads(first.events[-1][2])["code"] == "superseded"


async def test_password_in_the_redis_url(tmp_path: Path, sim: Sim) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-pw", "rows": 30, "interval": 0.05})
    server = RedisServer(password="s3cret-pass")
    server.start()
    try:
        async with replicas(tmp_path, sim, server, count=2) as nodes:
            path = "/api/v1/evaluations/e-pw/stream"
            received = [Received(), Received()]
            tasks = [asyncio.create_task(read_sse(node.url + path, token(f"pw{i}"), until=terminal, received=r))
                     for i, (node, r) in enumerate(zip(nodes, received, strict=True))]
            await wait_for(lambda: all(len(r.ids) >= 2 for r in received), message="both streams flowing")

            async def leases() -> float:
                return sum([await node.metric("gateway_leases_held") for node in nodes])

            assert await leases() == 1  # mid-run: exactly one replica holds the upstream stream
            got = await asyncio.gather(*tasks)
            assert all(r.events[-1][1] == "final" for r in got) and got[0].ids == got[1].ids
            assert all([await node.ready() for node in nodes])
        assert (await sim.resource("evaluations/e-pw"))["connects"] == 1
    finally:
        server.stop()


async def test_reject_policy_refuses_a_second_stream_on_another_replica(tmp_path: Path, sim: Sim,
                                                                         redis_server: RedisServer) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-rej", "rows": 100, "interval": 0.05})
    async with replicas(tmp_path, sim, redis_server, count=2, one_stream_per_consumer="reject") as nodes:
        path = "/api/v1/evaluations/e-rej/stream"
        first = Received()
        task = asyncio.create_task(read_sse(nodes[0].url + path, token("bob"), received=first, until=terminal,
                                            timeout=15))
        await wait_for(lambda: len(first.events) >= 3, message="first stream")
        second = await read_sse(nodes[1].url + path, token("bob"))
        assert second.status == 409 and "stream_already_open" in second.raw[0]
        assert not terminal(first), "the first stream is not disturbed"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_polls_share_one_cache_across_replicas(tmp_path: Path, sim: Sim, redis_server: RedisServer) -> None:
    async with replicas(tmp_path, sim, redis_server, count=2, poll_cache_ttl=30) as nodes, \
            httpx.AsyncClient() as client:
        bodies = [(await client.get(node.url + "/api/v1/evaluations/e-pc", headers=token(f"p{i}"))).json()
                  for i, node in enumerate(nodes)]
    assert bodies[0] == bodies[1] and "status" in json.dumps(bodies[0])
    assert (await sim.stats())["requests"]["evaluations/e-pc"]["polls"] == 1


async def test_authorization_decisions_are_shared_across_replicas(tmp_path: Path, sim: Sim,
                                                                   redis_server: RedisServer) -> None:
    hook = Webhook()
    async with serve(hook.app()) as hook_url, replicas(
            tmp_path, sim, redis_server, count=2,
            auth={"authorize_url": f"{hook_url}/authorize", "authorize_cache_ttl": 60}) as nodes, \
            httpx.AsyncClient() as client:
        headers = {"Authorization": "Bearer " + mint_token(SECRET, "HS256", "carol", 300, {"streams": []})}
        statuses = [(await client.get(node.url + "/api/v1/evaluations/e-az-ok", headers=headers)).status_code
                    for node in nodes]
        denied = [(await client.get(node.url + "/api/v1/evaluations/e-az-no", headers=headers)).status_code
                  for node in nodes]
    assert statuses == [200, 200] and denied == [403, 403]
    # One question per decision for the whole cluster: the second replica found it in Redis.
    assert [c["resource"] for c in hook.calls] == ["evaluations/e-az-ok", "evaluations/e-az-no"]


async def test_history_expires_after_the_end_and_redis_metrics_move(tmp_path: Path, sim: Sim,
                                                                     redis_server: RedisServer) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-ttl", "rows": 3, "interval": 0.01})
    async with replicas(tmp_path, sim, redis_server, count=2, history_ttl=30) as nodes, \
            _redis(redis_server) as redis:
        path = "/api/v1/evaluations/e-ttl/stream"
        got = await asyncio.gather(*(read_sse(node.url + path, token(f"m{i}"), until=terminal)
                                     for i, node in enumerate(nodes)))
        assert all(r.events[-1][1] == "final" for r in got)
        key = KEYS.stream("evaluations/e-ttl")

        async def expiring() -> bool:
            return bool(0 < await redis.pttl(key) <= 30_000)

        await wait_for(expiring, timeout=5, message="the ended resource's history to get its TTL")
        for node in nodes:
            assert await node.metric("gateway_redis_roundtrip_seconds_count") > 0
        lags = [await node.metric("gateway_redis_tail_lag_seconds_count") for node in nodes]
        assert sum(lags) > 0


async def test_redis_restart_mid_run(tmp_path: Path, sim: Sim, redis_server: RedisServer) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-rr", "rows": 60, "interval": 0.05})
    async with replicas(tmp_path, sim, redis_server, count=2) as nodes:
        path = "/api/v1/evaluations/e-rr/stream"
        received = [Received() for _ in range(4)]
        tasks = [asyncio.create_task(follow([nodes[i % 2].url, nodes[(i + 1) % 2].url], path, f"u{i}", received[i]))
                 for i in range(4)]
        await wait_for(lambda: all(len(r.events) >= 10 for r in received), message="streams flowing")
        redis_server.stop()
        await wait_for(lambda: _broker_down(nodes[0]), timeout=5, message="the replica to see Redis gone")
        assert await nodes[0].ready()  # a blip shorter than broker.unready_after keeps it in the load balancer
        count = min(len(r.events) for r in received)
        await wait_for(lambda: any(len(r.events) > count + 3 for r in received), timeout=5,
                       message="the holder's subscribers keep flowing")
        redis_server.start()
        await wait_for(nodes[0].ready, timeout=8, message="ready again")
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=25)
        expected = [str(i) for i in range(1, 2 + 120 + 3)]
        for i, r in enumerate(received):
            signals = [e for e in r.events if e[1].startswith("gateway.")]
            assert r.ids == expected, f"client {i} (first replica {i % 2}): {r.ids[:30]} signals={signals}"
        assert (await sim.resource("evaluations/e-rr"))["max_concurrent"] == 1


async def test_redis_restart_old_holder_retakes_the_lease(tmp_path: Path, sim: Sim,
                                                           redis_server: RedisServer) -> None:
    """The race behind the restart gap, forced: only the old holder can take the lease after Redis comes back empty.

    While Redis is down the holder's browsers keep getting events the other replica never
    sees; the new stream must still carry them, or the other replica's browsers skip them.
    """
    await sim.post("/_sim/configure", {"resource": "evaluations/e-rt", "rows": 40, "interval": 0.05})
    async with replicas(tmp_path, sim, redis_server, count=2) as nodes, _redis(redis_server) as redis:
        path = "/api/v1/evaluations/e-rt/stream"
        received = [Received() for _ in range(4)]
        tasks = [asyncio.create_task(follow([nodes[i % 2].url, nodes[(i + 1) % 2].url], path, f"u{i}", received[i]))
                 for i in range(4)]
        await wait_for(lambda: all(len(r.events) >= 10 for r in received), message="streams flowing")
        holders = [n for n in nodes if await n.metric("gateway_leases_held") == 1]
        assert len(holders) == 1
        holder = holders[0]
        other = nodes[1 - nodes.index(holder)]
        on_holder = received[nodes.index(holder)]
        redis_server.stop()
        await wait_for(lambda: _broker_down(holder), timeout=5, message="the holder to see Redis gone")
        count = len(on_holder.events)
        await wait_for(lambda: len(on_holder.events) >= count + 3, timeout=5,
                       message="the holder's browsers keep getting events")
        other.proc.send_signal(signal.SIGSTOP)
        try:
            redis_server.start()
            lease, stream = KEYS.lease("evaluations/e-rt"), KEYS.stream("evaluations/e-rt")
            await wait_for(lambda: _lease_and_log(redis, lease, stream), timeout=8,
                           message="the old holder holds the lease again and appends")
        finally:
            other.proc.send_signal(signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)
        expected = [str(i) for i in range(1, 2 + 80 + 3)]
        for i, r in enumerate(received):
            assert r.ids == expected, f"client {i} (first replica {i % 2}): {r.ids}"
        assert (await sim.resource("evaluations/e-rt"))["max_concurrent"] == 1


async def test_redis_restarted_again_and_again(tmp_path: Path, sim: Sim, redis_server: RedisServer) -> None:
    """Redis comes back empty three times, at different moments and for different lengths: still no gap anywhere."""
    await sim.post("/_sim/configure", {"resource": "evaluations/e-ra", "rows": 60, "interval": 0.04})
    async with replicas(tmp_path, sim, redis_server, count=3) as nodes:
        path = "/api/v1/evaluations/e-ra/stream"
        received = [Received() for _ in range(6)]
        tasks = [asyncio.create_task(follow([n.url for n in nodes[i % 3:] + nodes[:i % 3]], path, f"u{i}",
                                            received[i], deadline=25)) for i in range(6)]
        for mark, outage in ((8, 2), (40, 6), (75, 0)):
            await wait_for(lambda m=mark: min(len(r.ids) for r in received) >= m, timeout=10,
                           message=f"every browser past event {mark}")
            redis_server.stop()
            await wait_for(lambda: _broker_down(nodes[0]), timeout=5, message="the replica to see Redis gone")
            count = max(len(r.ids) for r in received)
            await wait_for(lambda c=count, o=outage: max(len(r.ids) for r in received) >= c + o,
                           timeout=5, message="events during the outage")
            redis_server.start()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=25)
        expected = [str(i) for i in range(1, 2 + 120 + 3)]
        for i, r in enumerate(received):
            assert r.ids == expected, f"client {i}: {r.ids}"
        assert (await sim.resource("evaluations/e-ra"))["max_concurrent"] == 1


async def test_stream_lost_under_a_live_lease(tmp_path: Path, sim: Sim, redis_server: RedisServer) -> None:
    """Redis loses acknowledged entries but not the lease (a restart from an older snapshot; here: the key is gone).

    The holder's next append finds the hole and puts back what it has first, so no replica skips anything.
    """
    await sim.post("/_sim/configure", {"resource": "evaluations/e-sl", "rows": 30, "interval": 0.05})
    async with replicas(tmp_path, sim, redis_server, count=2) as nodes, _redis(redis_server) as redis:
        path = "/api/v1/evaluations/e-sl/stream"
        received = [Received() for _ in range(4)]
        tasks = [asyncio.create_task(follow([nodes[i % 2].url, nodes[(i + 1) % 2].url], path, f"u{i}", received[i]))
                 for i in range(4)]
        await wait_for(lambda: all(len(r.events) >= 10 for r in received), message="streams flowing")
        await redis.delete(KEYS.stream("evaluations/e-sl"))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=15)
        entries = await redis.xrange(KEYS.stream("evaluations/e-sl"), count=1)
        expected = [str(i) for i in range(1, 2 + 60 + 3)]
        for i, r in enumerate(received):
            assert r.ids == expected, f"client {i}: {r.ids}"
        assert entries[0][0] == "1-0"  # the whole history is back in the shared log
        assert (await sim.resource("evaluations/e-sl"))["max_concurrent"] == 1


async def test_tailer_behind_the_trimmed_stream_tells_its_subscribers(tmp_path: Path, sim: Sim) -> None:
    """Entries trimmed (MAXLEN) before a replica read them: its browsers get `continuity_lost`, never a silent gap."""
    from gateway.broker.redis.client import RedisClient
    from gateway.broker.redis.keys import event_entry_id
    from gateway.config import BrokerConfig
    from gateway.metrics import Metrics

    # Small stream nodes, so `MAXLEN ~ replay_buffer` trims close to replay_buffer.
    server = RedisServer("--stream-node-max-entries", "4")
    server.start()
    resource = "evaluations/e-gap"
    client = RedisClient(BrokerConfig(kind="redis", url=server.url, key_prefix="t:"), Metrics(CollectorRegistry()))
    keys = client.keys

    async def append(first: int, last: int) -> None:
        # A holder (this test) appends events first..last in one atomic call; the last one is `final`.
        args = ["test-holder", "20", "1", "60000", keys.appended_channel, resource]
        for ordinal in range(first, last + 1):
            fields = ["k", "e", "i", str(ordinal), "y", "final" if ordinal == 303 else "row_complete", "d", "{}"]
            args += [event_entry_id(ordinal), str(len(fields)), *fields]
        await client.fenced_xadd(keys=[keys.lease(resource), keys.stream(resource)], args=args)

    try:
        # The lease is held elsewhere: the replica only tails.
        await client.redis.set(keys.lease(resource), "test-holder", px=60_000)
        await append(1, 3)
        async with replicas(tmp_path, sim, server, count=1, replay_buffer=20) as (node,), \
                _ws(node.url, "ws-user") as ws:
            path = f"/api/v1/{resource}/stream"
            live = Received()
            reader = asyncio.create_task(read_sse(node.url + path, token("live"), received=live, until=terminal))
            await ws.send(type="subscribe", stream=resource)
            await wait_for(lambda: len(live.ids) == 3 and len(ws.events(resource)) == 3, message="events 1-3")
            # 300 events at once: the stream keeps about the last 20, so the tailer cannot read 4, 5, ...
            await append(4, 303)
            await asyncio.wait_for(reader, timeout=10)
            await ws.until(lambda c: len(c.events(resource)) >= 10 and c.events(resource)[-1]["eventType"] == "final")
            resumed = await read_sse(node.url + path, {**token("late"), "Last-Event-ID": "3"}, until=terminal)
    finally:
        await client.aclose()
        server.stop()

    oldest = int(live.ids[3] or 0)
    assert 4 < oldest < 303 - 10
    signal_at = [e[1] for e in live.events].index("gateway.continuity_lost")
    assert live.ids[:3] == ["1", "2", "3"] and signal_at == 3
    assert json.loads(live.events[signal_at][2]) == {"code": "continuity_lost", "reason": "trimmed",
                                                      "oldestRetainedId": str(oldest)}
    assert live.ids[3:] == [str(i) for i in range(oldest, 304)]
    # The same on WebSocket: the `continuity_lost` error sits exactly where the hole is.
    kinds = [m["type"] for m in ws.messages if m["type"] in ("event", "error")]
    assert kinds[:4] == ["event", "event", "event", "error"]
    assert ws.errors(resource) == ["continuity_lost"]
    assert [e["id"] for e in ws.events(resource)] == [1, 2, 3, *range(oldest, 304)]
    # Nobody resumes across the hole silently: a later client after event 3 is told too.
    assert resumed.events[0][1] == "gateway.continuity_lost"
    assert json.loads(resumed.events[0][2])["reason"] == "trimmed"
    assert resumed.ids == [str(i) for i in range(oldest, 304)]


async def test_optimization_job_across_replicas_on_one_upstream_socket(tmp_path: Path, sim: Sim,
                                                                        redis_server: RedisServer) -> None:
    """A job watched on two replicas (WebSocket and SSE): one upstream socket and subscription, the same events."""
    stream = "optimizations/j-rs"
    await sim.post("/_sim/configure", {"resource": stream, "iterations": 4, "interval": 0.02})
    async with replicas(tmp_path, sim, redis_server, count=2) as nodes, \
            _ws(nodes[0].url, "ws-0") as first, _ws(nodes[1].url, "ws-1") as second:
        sse = [asyncio.create_task(read_sse(f"{node.url}/api/v1/{stream}/stream", token(f"sse-{i}"),
                                            until=_job_over, timeout=15)) for i, node in enumerate(nodes)]
        await first.send(type="subscribe", jobId="j-rs")
        await wait_for(lambda: len(first.events(stream)) >= 3, message="the job's first events")
        await second.send(type="subscribe", jobId="j-rs")
        for client in (first, second):
            await client.until(lambda c: c.ended(stream), timeout=15, what="the job to complete")
        sse_results = await asyncio.wait_for(asyncio.gather(*sse), timeout=15)
    events = first.events(stream)
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["eventType"] == "job_complete"
    assert second.events(stream) == events
    assert first.errors() == [] and second.errors() == []
    for result in sse_results:
        assert result.status == 200
        assert [json.loads(e[2]) for e in result.events] == events
    stats = await sim.stats()
    assert stats["ws_connections"]["connects"] == 1
    assert stats[stream]["connects"] == 1 and stats[stream]["max_concurrent"] == 1


def _job_over(received: Received) -> bool:
    return any(e[1] in ("job_complete", "job_failed", "job_cancelled", "gateway.close") for e in received.events)


@contextlib.asynccontextmanager
async def _ws(url: str, sub: str) -> AsyncIterator[Client]:
    """A browser on the replica's `/ws` (token in the subprotocol), recording every message."""
    bearer = mint_token(SECRET, "HS256", sub, 300, {"streams": ["*/*"]})
    async with recording_client(url.replace("http://", "ws://", 1) + "/ws", protocols(bearer)) as client:
        yield client


@contextlib.asynccontextmanager
async def _redis(server: RedisServer) -> AsyncIterator[Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def _lease_and_log(redis: Any, lease: str, stream: str) -> bool:
    from redis.exceptions import RedisError

    try:
        return bool(await redis.exists(lease)) and await redis.xlen(stream) > 0
    except (RedisError, OSError):
        return False


async def _broker_down(node: Replica) -> bool:
    async with httpx.AsyncClient() as client:
        health = (await client.get(f"{node.url}/healthz")).json()
    return bool(health["broker"]["state"] == "down")


async def _not_ready(node: Replica) -> bool:
    return not await node.ready()


async def test_fenced_ex_holder_cannot_write(redis_server: RedisServer) -> None:
    from gateway.broker.redis.client import RedisClient
    from gateway.config import BrokerConfig
    from gateway.metrics import Metrics

    client = RedisClient(BrokerConfig(kind="redis", url=redis_server.url, key_prefix="f:"),
                         Metrics(CollectorRegistry()))
    keys = client.keys
    try:
        await client.redis.set(keys.lease("evaluations/x"), "old-holder", px=5000)
        appended = await client.fenced_xadd(keys=[keys.lease("evaluations/x"), keys.stream("evaluations/x")],
                                            args=["old-holder", "100", "1", "60000", "", "",
                                                  "1-0", "4", "k", "e", "i", "1"])
        assert appended == 1
        # A batch resent after its reply was lost appends nothing twice.
        appended = await client.fenced_xadd(keys=[keys.lease("evaluations/x"), keys.stream("evaluations/x")],
                                            args=["old-holder", "100", "1", "60000", "", "",
                                                  "1-0", "4", "k", "e", "i", "1",
                                                  "2-0", "4", "k", "e", "i", "2"])
        assert appended == 1
        # A batch that would leave a hole (Redis lost acknowledged entries) is refused with the last position.
        from redis.exceptions import ResponseError

        with pytest.raises(ResponseError, match="BEHIND 2"):
            await client.fenced_xadd(keys=[keys.lease("evaluations/x"), keys.stream("evaluations/x")],
                                     args=["old-holder", "100", "1", "60000", "", "",
                                                  "4-0", "4", "k", "e", "i", "4"])
        # The lease expires and a new holder (higher fencing token) takes it.
        await client.redis.set(keys.lease("evaluations/x"), "new-holder")
        with pytest.raises(ResponseError, match="FENCED"):
            await client.fenced_xadd(keys=[keys.lease("evaluations/x"), keys.stream("evaluations/x")],
                                     args=["old-holder", "100", "1", "60000", "", "",
                                                  "3-0", "4", "k", "e", "i", "3"])
        entries = await client.redis.xrange(keys.stream("evaluations/x"))
        assert [(entry_id, fields["i"]) for entry_id, fields in entries] == [("1-0", "1"), ("2-0", "2")]
    finally:
        await client.aclose()


async def test_every_key_expires_when_a_stream_is_abandoned_mid_run(tmp_path: Path, sim: Sim,
                                                                     redis_server: RedisServer) -> None:
    """Keys written for a stream nobody watches any more expire on their own: log, fence, claims, caches."""
    await sim.post("/_sim/configure", {"resource": "evaluations/e-ab", "rows": 400, "interval": 0.05})
    async with replicas(tmp_path, sim, redis_server, count=2, history_ttl=20) as nodes, \
            _redis(redis_server) as redis:
        path = "/api/v1/evaluations/e-ab/stream"
        for i, node in enumerate(nodes):
            got = await read_sse(node.url + path, token(f"ab{i}"), until=lambda r: len(r.ids) >= 5)
            assert got.status == 200
            async with httpx.AsyncClient() as client:  # a poll, cached in Redis too
                assert (await client.get(f"{node.url}/api/v1/evaluations/e-ab", headers=token(f"ab{i}"))).status_code \
                    == 200
        # Everyone left mid-run: after `linger` the holder stops and releases its lease.
        await wait_for(lambda: _gone(redis, KEYS.lease("evaluations/e-ab")), timeout=10, message="the lease released")
        keys = await redis.keys("t:*")
        assert KEYS.stream("evaluations/e-ab") in keys and KEYS.fence("evaluations/e-ab") in keys
        keep_ms = (max(20, 2 * LEASE_TTL) + LEASE_TTL) * 1000
        for key in keys:
            ttl = await redis.pttl(key)
            assert 0 < ttl <= max(keep_ms, 60_000), (key, ttl)


async def _gone(redis: Any, key: str) -> bool:
    return not await redis.exists(key)


async def test_a_failing_subscriber_does_not_stop_the_tailer(redis_server: RedisServer) -> None:
    """An exception from one subscriber inside the tailer's publish stays with that subscriber."""
    from gateway.broker.redis.broker import RedisBroker
    from gateway.broker.redis.client import RedisClient
    from gateway.broker.redis.keys import event_entry_id
    from gateway.config import BrokerConfig, LimitsConfig
    from gateway.hub.registry import Hub
    from gateway.metrics import Metrics

    class NoFeeds:
        def attach(self, topic: Any) -> None:
            raise AssertionError("this replica never holds the lease in this test")

        async def detach(self, topic: Any) -> None:
            return None

    metrics = Metrics(CollectorRegistry())
    config = BrokerConfig(kind="redis", url=redis_server.url, key_prefix="t:", lease_ttl=LEASE_TTL)
    limits = LimitsConfig()
    client = RedisClient(config, metrics)
    broker = RedisBroker(config, limits, NoFeeds(), metrics, client)
    hub = Hub(limits, broker, metrics)
    resource = "evaluations/e-bad-sub"

    async def append(first: int, last: int, final: int = 0) -> None:
        args = ["test-holder", "100", "1", "60000", KEYS.appended_channel, resource]
        for ordinal in range(first, last + 1):
            fields = ["k", "e", "i", str(ordinal), "y", "final" if ordinal == final else "row_complete", "d", "{}"]
            args += [event_entry_id(ordinal), str(len(fields)), *fields]
        await client.fenced_xadd(keys=[KEYS.lease(resource), KEYS.stream(resource)], args=args)

    notices = asyncio.create_task(broker.notices.run())
    try:
        await asyncio.wait_for(broker.notices.subscribed.wait(), timeout=5)
        await client.redis.set(KEYS.lease(resource), "test-holder", px=60_000)  # held elsewhere: tail only
        good, bad = hub.subscribe(resource), hub.subscribe(resource)
        aborted: list[int] = []

        def explode() -> None:
            raise RuntimeError("a broken subscriber")

        bad.wake, bad.abort = explode, lambda: aborted.append(1)
        await append(1, 3)
        await wait_for(lambda: good.topic.head == 3, message="events 1-3 tailed")
        await append(4, 6, final=6)
        await wait_for(lambda: good.topic.ended, message="the rest tailed")
        assert [e.id for e in good.topic.events] == ["1", "2", "3", "4", "5", "6"]
        assert bad.failed and aborted == [1] and not good.closed
    finally:
        notices.cancel()
        await asyncio.gather(notices, return_exceptions=True)
        await hub.aclose()
        await broker.aclose()


async def test_a_failed_stream_is_retried_for_the_next_subscriber_in_shared_mode(
        sim: Sim, gateway_factory: Any, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure's end entry stays in the shared log, but a newcomer still gets a fresh upstream attempt."""
    from gateway.upstream.sse_feed import SSEFeed

    await sim.post("/_sim/configure", {"resource": "evaluations/e-rd", "rows": 10, "interval": 0.01})
    gateway = await gateway_factory(broker={"kind": "redis", "url": redis_server.url, "key_prefix": "t:",
                                            "lease_ttl": LEASE_TTL})
    real = SSEFeed._decode
    crashes = [1]

    async def crash_once(self: SSEFeed, response: httpx.Response) -> int:
        if crashes:
            crashes.pop()
            raise RuntimeError("a bug in the feed")
        return await real(self, response)

    monkeypatch.setattr(SSEFeed, "_decode", crash_once)
    url = f"{gateway.url}/api/v1/evaluations/e-rd/stream"
    first = await read_sse(url, gateway.headers("alice"), until=terminal)
    [close] = first.of_type("gateway.close")
    assert close["code"] == "upstream_unavailable"
    second = await read_sse(url, gateway.headers("bob"), until=terminal, timeout=15)
    assert second.events[-1][1] == "final" and not second.of_type("gateway.close")
    assert second.ids == [str(i) for i in range(1, len(second.ids) + 1)]
