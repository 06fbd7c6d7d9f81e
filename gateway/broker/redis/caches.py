"""Caches every replica shares through Redis: polling results and authorization-webhook decisions."""

from __future__ import annotations

import base64
import contextlib
import json

from redis.exceptions import RedisError

from gateway.broker.redis.client import RedisClient
from gateway.upstream.polling import PollResult


class RedisPollCache:
    """The polling cache shared by every replica (one upstream poll per TTL cluster-wide)."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client

    async def get(self, resource: str) -> PollResult | None:
        client = self.client
        try:
            raw = await client.call(lambda: client.redis.get(client.keys.poll(resource)))
        except (RedisError, OSError):
            return None
        if not raw:
            return None
        try:
            data = json.loads(raw)
            return PollResult(int(data["s"]), base64.b64decode(data["b"]), data.get("r"))
        except (ValueError, KeyError, TypeError):
            return None

    async def put(self, resource: str, result: PollResult, ttl: float) -> None:
        if ttl <= 0:
            return
        client = self.client
        raw = json.dumps({"s": result.status, "b": base64.b64encode(result.body).decode(), "r": result.retry_after})
        with contextlib.suppress(RedisError, OSError):
            await client.call(lambda: client.redis.set(client.keys.poll(resource), raw, px=max(1, int(ttl * 1000))))


class RedisDecisionCache:
    """Authorization-webhook decisions shared by every replica."""

    def __init__(self, client: RedisClient, ttl: float) -> None:
        self.client = client
        self.ttl = ttl

    async def get(self, consumer: str, resource: str) -> bool | None:
        client = self.client
        try:
            raw = await client.call(lambda: client.redis.get(client.keys.decision(consumer, resource)))
        except (RedisError, OSError):
            return None
        return None if raw is None else raw == "1"

    async def put(self, consumer: str, resource: str, allowed: bool) -> None:
        if self.ttl <= 0:
            return
        client = self.client
        with contextlib.suppress(RedisError, OSError):
            await client.call(lambda: client.redis.set(client.keys.decision(consumer, resource),
                                                       "1" if allowed else "0", px=max(1, int(self.ttl * 1000))))
