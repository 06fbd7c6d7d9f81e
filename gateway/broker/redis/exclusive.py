"""The one-stream-per-consumer rule across replicas: a key per (consumer, resource), and a supersede channel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time

from redis.exceptions import RedisError

from gateway.broker.redis.client import RedisClient
from gateway.codec.closes import SUPERSEDED
from gateway.errors import LimitError
from gateway.limits.exclusive import Closable
from gateway.upstream.backoff import Backoff


class RedisExclusive:
    """One stream per consumer per resource across replicas: a key per pair, and a supersede channel.

    Local bookkeeping stays in the in-process `ExclusiveStreams`; this adds the cluster view.
    With `replace`, claiming publishes a notice and every other replica closes its stream for
    that pair as `superseded`. With `reject`, the pair's key is taken with SET NX and refreshed
    while the stream is open, so a second stream anywhere gets 409.
    """

    TTL = 60.0

    def __init__(self, client: RedisClient, policy: str) -> None:
        self.client = client
        self.policy = policy
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
        """Listen for supersede notices and keep this replica's reject-policy keys alive."""
        client = self.client
        backoff = Backoff(0.2, 5.0)
        while True:
            pubsub = client.redis.pubsub()
            try:
                await pubsub.subscribe(client.keys.supersede_channel)
                backoff.reset()
                refresh_at = time.monotonic() + self.TTL / 3
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and isinstance(message.get("data"), str):
                        self.on_notice(message["data"])
                    if time.monotonic() >= refresh_at:
                        refresh_at = time.monotonic() + self.TTL / 3
                        for (consumer, resource), (_owner, _sub) in list(self._open.items()):
                            await client.redis.pexpire(client.keys.exclusive(consumer, resource),
                                                       int(self.TTL * 1000))
            except (RedisError, OSError):
                await asyncio.sleep(backoff.next())
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
