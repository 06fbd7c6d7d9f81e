"""The one-stream-per-consumer rule across replicas: a key per (consumer, resource), and a supersede channel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets

from redis.exceptions import RedisError

from gateway.broker.redis.client import Notices, RedisClient
from gateway.codec.closes import SUPERSEDED
from gateway.errors import LimitError
from gateway.limits.exclusive import Closable


class RedisExclusive:
    """One stream per consumer per resource across replicas: a key per pair, and a supersede channel.

    Local bookkeeping stays in the in-process `ExclusiveStreams`; this adds the cluster view.
    With `replace`, claiming publishes a notice and every other replica closes its stream for
    that pair as `superseded`. With `reject`, the pair's key is taken with SET NX and refreshed
    while the stream is open, so a second stream anywhere gets 409.
    """

    TTL = 60.0

    def __init__(self, client: RedisClient, policy: str, notices: Notices | None = None) -> None:
        self.client = client
        self.policy = policy
        if notices is not None:
            notices.on(client.keys.supersede_channel, self.on_notice)
        self.owner_prefix = secrets.token_hex(6)
        self._open: dict[tuple[str, str], tuple[str, Closable]] = {}
        self._counter = 0

    def _owner(self) -> str:
        self._counter += 1
        return f"{self.owner_prefix}:{self._counter}"

    async def acquire(self, consumer: str, resource: str, sub: Closable) -> None:
        client = self.client
        key = client.keys.exclusive(consumer, resource)
        owner = self._owner()
        try:
            if self.policy == "reject":
                ok = await client.call(lambda: client.redis.set(key, owner, nx=True, px=int(self.TTL * 1000)))
                if not ok:
                    raise LimitError(f"a stream for {resource} is already open for this user", status=409,
                                     code="stream_already_open", reason="one_stream_per_consumer")
            else:
                await client.call(lambda: client.redis.set(key, owner, px=int(self.TTL * 1000)))
                notice = json.dumps({"consumer": consumer, "resource": resource, "owner": owner})
                await client.call(lambda: client.redis.publish(client.keys.supersede_channel, notice))
        except (RedisError, OSError):
            pass  # Redis down: the local rule still holds on this replica
        self._open[(consumer, resource)] = (owner, sub)

    async def release(self, consumer: str, resource: str, sub: Closable) -> None:
        entry = self._open.get((consumer, resource))
        if entry is None or entry[1] is not sub:
            return
        del self._open[(consumer, resource)]
        client = self.client
        with contextlib.suppress(RedisError, OSError):
            await client.call(lambda: client.release(keys=[client.keys.exclusive(consumer, resource)],
                                                     args=[entry[0]]))

    def on_notice(self, message: str) -> None:
        try:
            notice = json.loads(message)
            pair = (notice["consumer"], notice["resource"])
        except (ValueError, KeyError, TypeError):
            return
        entry = self._open.get(pair)
        if entry is not None and entry[0] != notice.get("owner") and not entry[1].closed:
            entry[1].close(SUPERSEDED)

    async def run(self) -> None:
        """Keep this replica's claims alive (supersede notices arrive through the broker's `Notices`)."""
        client = self.client
        while True:
            await asyncio.sleep(self.TTL / 3)
            ttl_ms = int(self.TTL * 1000)
            for consumer, resource in list(self._open):
                key = client.keys.exclusive(consumer, resource)
                with contextlib.suppress(RedisError, OSError):
                    await client.call(lambda k=key, t=ttl_ms: client.redis.pexpire(k, t))  # type: ignore[misc]
