"""Several gateway replicas on a real Redis: one upstream stream per resource, failover, no gap.

Each test starts its own `redis-server` on a free loopback port and real `gateway serve`
processes; the simulator runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.auth import mint_token
from tests.conftest import API_KEY, SECRET, Received, Sim, read_sse, terminal
from tests.servers import free_port, subprocess_server, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]

LEASE_TTL = 1.5


class RedisServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import socket

        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.01)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    server.start()
    yield server
    server.stop()


class Replica:
    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"

    async def metric(self, name: str) -> float:
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"{self.url}/metrics")).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def ready(self) -> bool:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{self.url}/readyz")).status_code == 200


@contextlib.asynccontextmanager
async def replicas(tmp_path: Path, sim: Sim, redis: RedisServer, count: int = 3,
                   **limits: Any) -> AsyncIterator[list[Replica]]:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": 0, "drain_timeout": 2},
        "upstream": {"base_url": sim.url, "api_key": "${TEST_KEY}", "backoff_initial": 0.05, "backoff_max": 0.5},
        "auth": {"jwt": {"algorithms": ["HS256"], "secret": "${TEST_SECRET}"}},
        "limits": {"heartbeat": 0.5, "linger": 1, **limits},
        "broker": {"kind": "redis", "url": "${TEST_REDIS_URL}", "key_prefix": "t:", "lease_ttl": LEASE_TTL},
        "logging": {"level": "warning"},
    }))
    env = {"TEST_KEY": API_KEY, "TEST_SECRET": SECRET, "TEST_REDIS_URL": redis.url}
    with contextlib.ExitStack() as stack:
        started = []
        for _ in range(count):
            port = free_port()
            proc = stack.enter_context(subprocess_server(["serve", "--config", str(config), "--port", str(port)],
                                                         port, env=env))
            started.append(Replica(port, proc))
        yield started


def token(sub: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + mint_token(SECRET, "HS256", sub, 300, {"streams": ["*/*"]})}


async def follow(urls: list[str], path: str, sub: str, received: Received, deadline: float = 20) -> None:
    """A browser: stream from one replica; when it dies or drains, resume on the next with Last-Event-ID."""
    stop = time.monotonic() + deadline
    index = 0
    while time.monotonic() < stop and not any(e[1] in ("final", "error") for e in received.events):
        headers = token(sub)
        ids = received.ids
        if ids:
            headers["Last-Event-ID"] = ids[-1] or ""
        with contextlib.suppress(httpx.HTTPError, OSError, asyncio.TimeoutError):
            await read_sse(urls[index % len(urls)] + path, headers, received=received, timeout=10, until=terminal)
        if received.events and received.events[-1][1] == "gateway.close":
            received.events.pop()
        index += 1


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

        await wait_for(took_over, timeout=LEASE_TTL * 3, message="lease takeover")
        assert taken_over <= LEASE_TTL * 2
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


@pytest.mark.xfail(strict=False, reason="known intermittent gap right after the Redis kill under a loaded CI "
                   "machine (about 1 run in 15); root cause not found yet, see the note on the Redis issue")
async def test_redis_restart_mid_run(tmp_path: Path, sim: Sim, redis_server: RedisServer) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-rr", "rows": 60, "interval": 0.05})
    async with replicas(tmp_path, sim, redis_server, count=2) as nodes:
        path = "/api/v1/evaluations/e-rr/stream"
        received = [Received() for _ in range(4)]
        tasks = [asyncio.create_task(follow([nodes[i % 2].url, nodes[(i + 1) % 2].url], path, f"u{i}", received[i]))
                 for i in range(4)]
        await wait_for(lambda: all(len(r.events) >= 10 for r in received), message="streams flowing")
        redis_server.stop()
        await wait_for(lambda: _not_ready(nodes[0]), timeout=5, message="readiness false without Redis")
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


async def _not_ready(node: Replica) -> bool:
    return not await node.ready()


async def test_fenced_ex_holder_cannot_write(redis_server: RedisServer) -> None:
    from prometheus_client import CollectorRegistry

    from gateway.config import BrokerConfig
    from gateway.metrics import Metrics
    from gateway.redis_broker import RedisClient

    client = RedisClient(BrokerConfig(kind="redis", url=redis_server.url, key_prefix="f:"),
                         Metrics(CollectorRegistry()))
    keys = client.keys
    try:
        await client.redis.set(keys.lease("evaluations/x"), "old-holder", px=5000)
        await client.fenced_xadd(keys=[keys.lease("evaluations/x"), keys.stream("evaluations/x")],
                                 args=["old-holder", "100", "4", "k", "e", "i", "1"])
        # The lease expires and a new holder (higher fencing token) takes it.
        await client.redis.set(keys.lease("evaluations/x"), "new-holder")
        from redis.exceptions import ResponseError

        with pytest.raises(ResponseError, match="FENCED"):
            await client.fenced_xadd(keys=[keys.lease("evaluations/x"), keys.stream("evaluations/x")],
                                     args=["old-holder", "100", "4", "k", "e", "i", "2"])
        entries = await client.redis.xrange(keys.stream("evaluations/x"))
        assert [fields["i"] for _, fields in entries] == ["1"]
    finally:
        await client.aclose()
