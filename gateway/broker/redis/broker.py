"""The shared broker: many gateway replicas, still one upstream stream per resource.

Per resource with local subscribers, every replica runs a `StreamSession`:

* a **tailer** that reads the resource's Redis Stream once (history first, then live) and
  publishes into the local topic, so the in-process hub stays the fan-out hot path and
  event ids are the same on every replica. An entry's Redis id is its event's position in
  the resource's sequence (`<ordinal>-0`), not a clock reading, so a replica resumes reading
  where its topic is, whatever Redis lost or re-received meanwhile; a hole it cannot fill
  (entries trimmed before it read them) reaches its subscribers as `continuity_lost`;
* a **lease loop**: the replica that holds `lease:<resource>` (SET NX PX, renewed at a
  third of its TTL) runs the upstream feed. Its value carries a fencing token (INCR) and a
  nonce; every append is a Lua script that checks the value first, so a holder that lost
  its lease can never write again. A replica that still has subscribers takes the lease
  over when it expires and resumes upstream after the last event in the Redis Stream.

When Redis is unreachable nobody can take a lease over, so a holder keeps its upstream
feed and publishes to its own subscribers directly; when Redis returns it either renews
its lease or, if another replica has it, stops. A Redis that comes back empty (no
persistence) gets its log back from the next holder: it first appends the events its own
topic holds beyond the stream's end, then resumes upstream after them, so the events only
the old holder's browsers saw during the outage, or that a replica had not tailed yet, reach
every replica. The upstream's own one-stream rule (409) guards the overlap of a network
partition; the feed backs off on 409 until it clears.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

from redis.exceptions import RedisError

from gateway.broker.redis.client import Notices, RedisClient
from gateway.broker.redis.session import StreamSession
from gateway.config import BrokerConfig, LimitsConfig
from gateway.hub.ports import FeedRunner
from gateway.hub.topic import Topic
from gateway.metrics import Metrics


class RedisBroker:
    """The `Broker` for `broker.kind: redis`: leases, fenced appends and tailing per resource."""

    def __init__(self, config: BrokerConfig, limits: LimitsConfig, pool: FeedRunner, metrics: Metrics,
                 client: RedisClient | None = None, clock: Callable[[], float] = time.monotonic,
                 notices: Notices | None = None) -> None:
        self.config = config
        self.limits = limits
        self.pool = pool
        self.metrics = metrics
        self.clock = clock
        self.client = client or RedisClient(config, metrics, clock)
        self.replica_id = secrets.token_hex(6)
        self._sessions: dict[str, StreamSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: The replica's one pub/sub connection: append notices wake the tailers (and supersede notices
        #: reach `RedisExclusive`, which registers itself here).
        self.notices = notices or Notices(self.client)
        self.notices.on(self.client.keys.appended_channel, self._appended)
        self.notices.on_reconnect(self._poke_all)

    @property
    def healthy(self) -> bool:
        return self.client.healthy

    @property
    def keep_ms(self) -> int:
        """How long a resource's log and fence outlive their last append or lease renewal (ms).

        A live stream's holder renews them with its lease; an abandoned one's expire on their own.
        """
        lease = self.config.lease_ttl
        return int((max(self.limits.history_ttl, 2 * lease) + lease) * 1000)

    def _appended(self, resource: str) -> None:
        session = self._sessions.get(resource)
        if session is not None:
            session.poke()

    def _poke_all(self) -> None:
        for session in list(self._sessions.values()):
            session.poke()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def attach(self, topic: Topic) -> None:
        previous = self._sessions.get(topic.key)
        self._sessions[topic.key] = StreamSession(self, topic)
        if previous is not None:  # the hub replaced an ended topic with a fresh attempt
            self.spawn(previous.aclose())

    async def detach(self, topic: Topic) -> None:
        session = self._sessions.get(topic.key)
        if session is None or session.topic is not topic:
            return
        del self._sessions[topic.key]
        await session.aclose()

    async def describe(self, topic: Topic) -> dict[str, Any]:
        """For the admin API: this replica's feed of `topic` if it holds the lease, else who does.

        The lease value is `<replica_id>:<fence>:<nonce>` (`scripts.ACQUIRE`); `holder` is None when
        nobody holds it (between holders) or Redis cannot be asked.
        """
        session = self._sessions.get(topic.key)
        sink = session.sink if session is not None and session.topic is topic else None
        if sink is not None:
            return {**self.pool.describe(sink), "replica": self.replica_id, "holder": self.replica_id,
                    "holds_lease": True}
        client = self.client
        try:
            value: Any = await client.call(lambda: client.redis.get(client.keys.lease(topic.key)))
        except (RedisError, OSError):
            value = None
        holder = str(value).partition(":")[0] if value else None
        state = "ended" if topic.ended else ("remote" if holder else "connecting")
        return {"state": state, "replica": self.replica_id, "holder": holder, "holds_lease": False}

    async def aclose(self) -> None:
        sessions = list(self._sessions.values())
        self._sessions.clear()
        await asyncio.gather(*(s.aclose() for s in sessions), return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()
