"""The shared broker's Redis: one client for any topology, its health, and one subscriber for its notices.

`RedisClient` connects to a single Redis (`broker.url`), to the master a set of Sentinels
names (`broker.sentinels`, re-discovered after a failover) or to a Redis Cluster
(`broker.cluster`). Every command goes through `call`, which times it and tracks health: the
moment Redis stopped answering is kept, so readiness can tolerate a blip
(`broker.unready_after`). Connections are bounded (`broker.max_connections`, a blocking
pool): they do not grow with the number of streams.

`Notices` is this replica's one pub/sub connection: append notices (a tailer reads only
when its stream moved) and supersede notices (the cluster-wide one-stream rule) share it,
and whoever listens is told after every reconnect, since pub/sub loses what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError, ResponseError

from gateway.broker.redis import scripts
from gateway.broker.redis.keys import Keys
from gateway.config import BrokerConfig
from gateway.metrics import Metrics
from gateway.upstream.backoff import Backoff

log = logging.getLogger("gateway.redis")

T = TypeVar("T")
#: Seconds to connect to a Redis node before it counts as unreachable.
CONNECT_TIMEOUT = 2.0


def connect(config: BrokerConfig) -> Any:
    """A client for the configured topology (`redis.asyncio.Redis` or `RedisCluster`), connected lazily."""
    timeouts: dict[str, Any] = {"socket_timeout": max(2.0, config.lease_ttl), "socket_connect_timeout": CONNECT_TIMEOUT,
                                "decode_responses": True, "health_check_interval": 10}
    if config.sentinels:
        sentinel_options: dict[str, Any] = {"socket_timeout": CONNECT_TIMEOUT}
        if config.sentinel_password:
            sentinel_options["password"] = config.sentinel_password
        sentinel = Sentinel(list(config.endpoints()), sentinel_kwargs=sentinel_options,  # type: ignore[no-untyped-call]
                            password=config.password, **timeouts)
        return sentinel.master_for(str(config.sentinel_master), max_connections=config.max_connections,
                                   check_connection=True)
    if config.cluster:
        return RedisCluster.from_url(str(config.url), max_connections=config.max_connections, **timeouts)
    pool = aioredis.BlockingConnectionPool.from_url(str(config.url), max_connections=config.max_connections,
                                                    timeout=max(2.0, config.lease_ttl), **timeouts)
    return aioredis.Redis(connection_pool=pool)


class RedisClient:
    """The connection, its health, and round-trip timing for every command the gateway issues."""

    def __init__(self, config: BrokerConfig, metrics: Metrics, clock: Callable[[], float] = time.monotonic,
                 redis: Any = None) -> None:
        self.config = config
        self.keys = Keys(config.key_prefix)
        self.metrics = metrics
        self.clock = clock
        self.redis: Any = redis if redis is not None else connect(config)
        self.healthy = False
        #: When Redis stopped answering (this process's monotonic clock); None while it answers.
        self.down_since: float | None = clock()
        self.fenced_xadd = self.redis.register_script(scripts.FENCED_XADD)
        self.acquire = self.redis.register_script(scripts.ACQUIRE)
        self.renew = self.redis.register_script(scripts.RENEW)
        self.release = self.redis.register_script(scripts.RELEASE)

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one command, timing it and tracking health (connection errors mark Redis down)."""
        started = self.clock()
        try:
            result = await operation()
        except (RedisError, OSError) as exc:
            if not isinstance(exc, ResponseError) or "MASTERDOWN" in str(exc) or "CLUSTERDOWN" in str(exc):
                self.unavailable(exc)
            raise
        self.metrics.redis_roundtrip.observe(self.clock() - started)
        if not self.healthy:
            log.info("redis available")
            self.healthy = True
            self.down_since = None
        return result

    def unavailable(self, exc: BaseException) -> None:
        if self.healthy:
            log.warning("redis unavailable", extra={"error": type(exc).__name__})
            self.healthy = False
        if self.down_since is None:
            self.down_since = self.clock()

    def down_for(self) -> float:
        """Seconds Redis has not been answering (0 while it answers)."""
        return 0.0 if self.down_since is None else self.clock() - self.down_since

    async def watch_health(self, interval: float = 1.0) -> None:
        """Ping so readiness follows Redis even when no stream is busy."""
        while True:
            with contextlib.suppress(RedisError, OSError):
                await self.call(self.redis.ping)
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.redis.aclose()


class Notices:
    """This replica's one pub/sub subscription: handlers by channel, told again after every reconnect."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._handlers: dict[str, Callable[[str], None]] = {}
        self._on_reconnect: list[Callable[[], None]] = []
        #: Set while subscribed (tests and readiness details read it).
        self.subscribed = asyncio.Event()

    def on(self, channel: str, handler: Callable[[str], None]) -> None:
        self._handlers[channel] = handler

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """`callback` runs after every (re)subscription: whatever was published meanwhile was missed."""
        self._on_reconnect.append(callback)

    async def run(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while True:
            pubsub = self.client.redis.pubsub()
            try:
                await self.client.call(lambda p=pubsub: p.subscribe(*self._handlers))  # type: ignore[misc]
                self.subscribed.set()
                backoff.reset()
                for callback in self._on_reconnect:
                    callback()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None:
                        continue
                    handler = self._handlers.get(str(message.get("channel")))
                    data = message.get("data")
                    if handler is not None and isinstance(data, str):
                        try:
                            handler(data)
                        except Exception:  # one bad notice must not stop the subscription
                            log.exception("redis notice failed")
            except (RedisError, OSError) as exc:
                self.client.unavailable(exc)
                await asyncio.sleep(backoff.next())
            finally:
                self.subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
