"""Real Redis topologies for the shared-broker tests: one server, Sentinel (master, replica, three
sentinels) and a three-master Cluster, all `redis-server` processes on loopback; and gateway replicas.

A server finds its port by starting: a candidate port another process took meanwhile makes it
exit at once and the next is tried, so no port is reserved, released and bound again.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.auth.tokens import mint_token
from tests.conftest import API_KEY, SECRET, Received, Sim, read_sse, terminal
from tests.servers import subprocess_server

LEASE_TTL = 1.5


def _candidate_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class RedisServer:
    """A real `redis-server` (or `--sentinel`) on loopback."""

    def __init__(self, *options: str, password: str | None = None, config_file: Path | None = None) -> None:
        self.port = 0
        self.options = options
        self.password = password
        #: Sentinels rewrite their config file, so they get one of their own.
        self.config_file = config_file
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start on this server's port (again, after a `stop`), or on a free one the first time."""
        for _ in range(10):
            port = self.port or _candidate_port()
            if self._start_on(port):
                self.port = port
                return
            if self.port:
                break
        raise RuntimeError("redis-server did not start")

    def _start_on(self, port: int) -> bool:
        auth = ["--requirepass", self.password, "--masterauth", self.password] if self.password else []
        head = [str(self.config_file)] if self.config_file is not None else []
        self.proc = subprocess.Popen(
            ["redis-server", *head, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             *auth, *self.options],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False  # the port was taken: it could not bind
            if _answers(port):
                return True
            time.sleep(0.01)
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): a stalled Redis that keeps its connections and then carries on."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=20,
                          check=True).stdout


class SentinelSet:
    """A master, a replica and three sentinels watching them as `gw`."""

    NAME = "gw"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.master = RedisServer()
        self.replica = RedisServer()
        self.sentinels: list[RedisServer] = []

    def start(self) -> None:
        self.master.start()
        self.replica.options = ("--replicaof", "127.0.0.1", str(self.master.port))
        self.replica.start()
        for i in range(3):
            conf = self.workdir / f"sentinel-{i}.conf"
            conf.write_text(f"sentinel monitor {self.NAME} 127.0.0.1 {self.master.port} 2\n"
                            f"sentinel down-after-milliseconds {self.NAME} 1000\n"
                            f"sentinel failover-timeout {self.NAME} 4000\n"
                            f"sentinel parallel-syncs {self.NAME} 1\n")
            sentinel = RedisServer("--sentinel", config_file=conf)
            sentinel.start()
            self.sentinels.append(sentinel)

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def master_port(self) -> int:
        reply = cli(self.sentinels[0].port, "SENTINEL", "get-master-addr-by-name", self.NAME).split()
        return int(reply[1])

    def failover(self) -> None:
        cli(self.sentinels[0].port, "SENTINEL", "FAILOVER", self.NAME)

    def stop(self) -> None:
        for server in [*self.sentinels, self.replica, self.master]:
            server.stop()


class ClusterSet:
    """Three masters, no replicas, slots split by `redis-cli --cluster create`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nodes: list[RedisServer] = []

    def start(self) -> None:
        for i in range(3):
            node = RedisServer("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{i}.conf",
                               "--cluster-node-timeout", "2000", "--dir", str(self.workdir))
            node.start()
            self.nodes.append(node)
        subprocess.run(["redis-cli", "--cluster", "create", *(n.address for n in self.nodes), "--cluster-replicas",
                        "0", "--cluster-yes"], capture_output=True, text=True, timeout=30, check=True)
        deadline = time.monotonic() + 10
        while "cluster_state:ok" not in cli(self.nodes[0].port, "CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not come up")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class Replica:
    """One `gateway serve` process of the shared-broker tests."""

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

    async def health(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            body: dict[str, Any] = (await client.get(f"{self.url}/healthz")).json()
            return body


@contextlib.asynccontextmanager
async def replicas(tmp_path: Path, sim: Sim, redis: RedisServer | None, count: int = 3,
                   auth: dict[str, Any] | None = None, broker: dict[str, Any] | None = None,
                   **limits: Any) -> AsyncIterator[list[Replica]]:
    """`count` gateway replicas sharing the broker (`redis`'s URL, or the `broker` section given)."""
    config = tmp_path / "gateway.yaml"
    section = {"kind": "redis", "key_prefix": "t:", "lease_ttl": LEASE_TTL, **(broker or {})}
    if redis is not None:
        section["url"] = "${TEST_REDIS_URL}"
    config.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": 0, "drain_timeout": 2},
        "upstream": {"base_url": sim.url, "api_key": "${TEST_KEY}", "backoff_initial": 0.05, "backoff_max": 0.5},
        "auth": {"jwt": {"algorithms": ["HS256"], "secret": "${TEST_SECRET}"}, **(auth or {})},
        "limits": {"heartbeat": 0.5, "linger": 1, **limits},
        "broker": section,
        "logging": {"level": "warning"},
    }))
    env = {"TEST_KEY": API_KEY, "TEST_SECRET": SECRET}
    if redis is not None:
        env["TEST_REDIS_URL"] = redis.url
    with contextlib.ExitStack() as stack:
        started = []
        for _ in range(count):
            proc, ports = stack.enter_context(subprocess_server(["serve", "--config", str(config)], env=env))
            started.append(Replica(ports["port"], proc))
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
