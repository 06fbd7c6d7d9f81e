"""The shared broker's Redis connection: its health, its scripts, and round-trip timing for every command."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway.broker.redis import scripts
from gateway.broker.redis.keys import Keys
from gateway.config import BrokerConfig
from gateway.metrics import Metrics

log = logging.getLogger("gateway.redis")

T = TypeVar("T")


class RedisClient:
    """The connection, its health, and round-trip timing for every command the gateway issues."""

    def __init__(self, config: BrokerConfig, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.keys = Keys(config.key_prefix)
        self.metrics = metrics
        self.clock = clock
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            str(config.url), decode_responses=True, socket_timeout=max(2.0, config.lease_ttl),
            socket_connect_timeout=2.0, health_check_interval=10)
        self.healthy = False
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
            if not isinstance(exc, ResponseError):
                if self.healthy:
                    log.warning("redis unavailable", extra={"error": type(exc).__name__})
                self.healthy = False
            raise
        self.metrics.redis_roundtrip.observe(self.clock() - started)
        if not self.healthy:
            log.info("redis available")
        self.healthy = True
        return result

    async def watch_health(self, interval: float = 1.0) -> None:
        """Ping so readiness follows Redis even when no stream is busy."""
        while True:
            with contextlib.suppress(RedisError, OSError):
                await self.call(self.redis.ping)
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        await self.redis.aclose()
