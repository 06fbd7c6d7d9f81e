"""The shared broker: many gateway replicas, still one upstream stream per resource.

Per resource with local subscribers, every replica runs a `_Session`:

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
import base64
import contextlib
import hashlib
import json
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway.backoff import Backoff
from gateway.closes import CATALOGUE, SUPERSEDED, UPSTREAM_UNAVAILABLE, CloseReason
from gateway.config import BrokerConfig, LimitsConfig
from gateway.events import Event
from gateway.hub import Subscription, Topic
from gateway.metrics import Metrics
from gateway.polling import PollResult
from gateway.streams import TERMINAL_EVENTS, is_decimal

log = logging.getLogger("gateway.redis")

T = TypeVar("T")

# KEYS: lease, stream. ARGV: holder, maxlen, refuse_gap, ttl_ms, then per entry its id, its field count and
# its fields. The stream's TTL is set on every append (a stream abandoned mid-run expires on its own).
# One call appends a whole batch, so a burst from the upstream reaches the tailers as one
# read. An entry at or below the stream's last id is already there (a batch resent after its reply was
# lost, or history a new holder restores): it is skipped, so appending is idempotent. With refuse_gap
# set, a batch that would leave a hole after the stream's last entry (Redis lost acknowledged entries)
# is refused with `BEHIND <last ordinal>`, so the holder can put back what it has first.
_FENCED_XADD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('FENCED') end
if ARGV[3] == '1' and ARGV[5] then
  local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  local last = 0
  if top[1] then last = tonumber(string.match(top[1][1], '^(%d+)')) end
  local ordinal, seq = string.match(ARGV[5], '^(%d+)-(%d+)$')
  local needs = tonumber(ordinal) - 1
  if seq == '1' then needs = needs + 1 end
  if needs > last then return redis.error_reply('BEHIND ' .. last) end
end
local i = 5
local count = 0
while i <= #ARGV do
  local n = tonumber(ARGV[i + 1])
  local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], ARGV[i], unpack(ARGV, i + 2, i + n + 1))
  if type(added) == 'table' and added.err then
    if not string.find(added.err, 'equal or smaller', 1, true) then return added end
  else
    count = count + 1
  end
  i = i + n + 2
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return count
"""
#: Most entries one fenced append carries.
MAX_BATCH = 256
#: Longest a tailer's XREAD blocks (ms): well under the client's socket timeout (at least 2 s),
#: so an idle stream never looks like a dead Redis.
TAIL_BLOCK_MS = 1000
# KEYS: lease, stream, fence. ARGV: holder, lease ttl_ms, keep ttl_ms. The holder keeps its stream and
# fence counter alive with its lease; when nobody holds the lease they expire `keep` later.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS: lease, fence. ARGV: holder prefix, nonce, lease ttl_ms, keep ttl_ms. Returns the new holder value
# ("<prefix>:<fence>:<nonce>") or false when another replica holds the lease.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local fence = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local holder = ARGV[1] .. ':' .. fence .. ':' .. ARGV[2]
redis.call('SET', KEYS[1], holder, 'PX', ARGV[3])
return holder
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_REASONS = {reason.code: reason for reason in CATALOGUE}
_BEHIND = re.compile(r"BEHIND (\d+)")


class Fenced(Exception):
    """This replica no longer holds the lease it tried to write under."""


def consumer_tag(consumer: str) -> str:
    """A consumer as a key component: fixed length, no separator or brace whatever the token's `sub` holds."""
    digest = hashlib.sha256(consumer.encode("utf-8", "surrogatepass")).digest()[:18]
    return base64.urlsafe_b64encode(digest).decode()


class Keys:
    """Every Redis key the gateway uses, under one configurable prefix.

    A resource's keys all carry the resource as their hash tag (`gw:{evaluations/e1}:log`), so
    they live in one Redis Cluster slot and the Lua scripts may touch several of them. Resource
    ids never contain braces (`streams.resource_key`) and a consumer is hashed (`consumer_tag`),
    so no two (resource, consumer) pairs share a key, whatever `:` either holds.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _tagged(self, resource: str, name: str) -> str:
        return f"{self.prefix}{{{resource}}}:{name}"

    def stream(self, resource: str) -> str:
        # `log`, not the earliest builds' `stream:`: their entry ids were clock readings, these are positions.
        return self._tagged(resource, "log")

    def lease(self, resource: str) -> str:
        return self._tagged(resource, "lease")

    def fence(self, resource: str) -> str:
        return self._tagged(resource, "fence")

    def exclusive(self, consumer: str, resource: str) -> str:
        return self._tagged(resource, f"excl:{consumer_tag(consumer)}")

    def poll(self, resource: str) -> str:
        return self._tagged(resource, "poll")

    def decision(self, consumer: str, resource: str) -> str:
        return self._tagged(resource, f"authz:{consumer_tag(consumer)}")

    @property
    def supersede_channel(self) -> str:
        return f"{self.prefix}supersede"


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
        self.fenced_xadd = self.redis.register_script(_FENCED_XADD)
        self.acquire = self.redis.register_script(_ACQUIRE)
        self.renew = self.redis.register_script(_RENEW)
        self.release = self.redis.register_script(_RELEASE)

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


def event_entry_id(ordinal: int) -> str:
    """The Redis id of the event at `ordinal` (1-based position in its resource's sequence)."""
    return f"{ordinal}-0"


def end_entry_id(ordinal: int) -> str:
    """The Redis id of the end that follows the event at `ordinal` (0: before any event)."""
    return f"{ordinal}-1"


def entry_ordinal(entry_id: str) -> int:
    """The position an entry id stands for (its millisecond part)."""
    head, _, _ = entry_id.partition("-")
    return int(head) if head.isascii() and head.isdigit() else 0


class _Sink:
    """What the upstream feed writes to on the holder: fenced appends to the Redis Stream.

    It looks like a topic to the feed (last id, ordinal, publish, end) and keeps the
    upstream's order with a single writer task behind a queue. `backlog` is what the
    holder's own topic has beyond the stream's end (after Redis lost its data): it is
    appended first, so the shared log never misses what any replica may lack.
    """

    def __init__(self, session: _Session, holder: str, last_id: str | None, ordinal: int,
                 backlog: Iterable[tuple[int, Event]] = ()) -> None:
        topic = session.topic
        self.session = session
        self.key, self.kind, self.resource_id = topic.key, topic.kind, topic.resource_id
        self.holder = holder
        self.last_id = last_id
        self.ordinal = ordinal
        self.ended = False
        self.paused = False
        self._queue: asyncio.Queue[tuple[str, Any, int]] = asyncio.Queue()
        for backlog_ordinal, event in backlog:
            self._queue.put_nowait(("event", event, backlog_ordinal))
        #: The latest events in upstream order with their ordinals, appended or not yet: a switch to local
        #: delivery replays what the local topic lacks from here, so it never skips one queued or not yet tailed.
        self.history: deque[tuple[int, Event]] = deque(maxlen=session.broker.limits.replay_buffer)
        self._writer = asyncio.get_running_loop().create_task(self._write())

    def has_id(self, event_id: str) -> bool:
        return event_id == self.last_id or self.session.topic.has_id(event_id)

    def already_has(self, event_id: str) -> bool:
        """As `Topic.already_has`, against what this holder has appended."""
        last = self.last_id
        if last is not None and is_decimal(event_id) and is_decimal(last):
            return int(event_id) <= int(last)
        return self.has_id(event_id)

    def publish(self, event: Event) -> None:
        if self.ended:
            return
        self.last_id = event.id
        self.ordinal += 1
        if event.terminal:
            self.ended = True
        self.history.append((self.ordinal, event))
        self._queue.put_nowait(("event", event, self.ordinal))
        if not self.session.broker.client.healthy:
            self.session.publish_locally(self.history)

    def end(self, reason: CloseReason | None = None, detail: str | None = None) -> None:
        if self.ended and reason is None:
            return
        self.ended = True
        self._queue.put_nowait(("end", (reason, detail), self.ordinal))

    async def _write(self) -> None:
        client = self.session.broker.client
        keys = client.keys
        maxlen = str(self.session.broker.limits.replay_buffer)
        backoff = Backoff(0.05, 1.0)
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < MAX_BATCH:
                batch.append(self._queue.get_nowait())
            refuse_gap = True
            while True:
                args = [self.holder, maxlen, "1" if refuse_gap else "0", str(self.session.broker.keep_ms)]
                for kind, item, ordinal in batch:
                    fields = _fields(kind, item)
                    args += [event_entry_id(ordinal) if kind == "event" else end_entry_id(ordinal),
                             str(len(fields)), *fields]
                try:
                    await client.call(lambda a=args: client.fenced_xadd(  # type: ignore[misc]
                        keys=[keys.lease(self.key), keys.stream(self.key)], args=a))
                    backoff.reset()
                    break
                except (RedisError, OSError) as exc:
                    if isinstance(exc, ResponseError) and "FENCED" in str(exc):
                        self.session.lost_lease(self)
                        return
                    behind = _BEHIND.search(str(exc)) if isinstance(exc, ResponseError) else None
                    if behind is not None:
                        # Redis lost entries it had acknowledged (it restarted from an older snapshot):
                        # put back what this replica still has, then append anyway.
                        kind, _item, first = batch[0]
                        batch = self._missing(int(behind.group(1)), first - 1 if kind == "event" else first) + batch
                        refuse_gap = False
                        continue
                    if isinstance(exc, ResponseError):
                        log.warning("redis refused an append; retrying", extra={"error": str(exc)[:200]})
                    # Redis is down: nobody can take the lease over, so serve local subscribers
                    # directly, and keep these events for the shared log until Redis is back.
                    self.session.publish_locally(self.history)
                    for kind, item, ordinal in batch:
                        if kind == "end" and ordinal <= self.session.ordinal:
                            self.session.topic.end(*item)
                    await asyncio.sleep(backoff.next())
            finished = False
            for kind, item, _ordinal in batch:
                finished = finished or kind == "end" or (kind == "event" and item.terminal)
            if finished:
                await self.session.finish_history()

    def _missing(self, last: int, before: int) -> list[tuple[str, Any, int]]:
        """What this replica holds between the stream's last entry and `before` (inclusive)."""
        held = dict(self.session.retained)
        held.update(self.history)
        return [("event", held[ordinal], ordinal) for ordinal in range(last + 1, before + 1) if ordinal in held]

    async def aclose(self) -> None:
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)


def _sent_at(fields: dict[str, str]) -> float:
    """When the holder appended an entry (its wall clock), 0 if unknown."""
    try:
        return float(fields.get("t", "0") or 0)
    except ValueError:
        return 0.0


def _fields(kind: str, item: Any) -> list[str]:
    if kind == "event":
        event: Event = item
        return ["k", "e", "i", event.id, "y", event.type, "d", event.data, "t", repr(time.time())]
    reason, detail = item
    return ["k", "x", "c", reason.code if reason else "", "m", detail or "", "t", repr(time.time())]


class _Session:
    """One resource on one replica: a tailer, and a lease loop that may run the upstream feed."""

    def __init__(self, broker: RedisBroker, topic: Topic) -> None:
        self.broker = broker
        self.topic = topic
        self.sink: _Sink | None = None
        #: Position (in the resource's sequence) of the last event published into the local topic.
        self.ordinal = 0
        #: What the local topic retains, with positions: a new holder restores it to a Redis that lost it.
        self.retained: deque[tuple[int, Event]] = deque(maxlen=broker.limits.replay_buffer)
        #: Wall-clock creation time: ends that a retried stream's log still holds from before are stale.
        self.started_at = time.time()
        #: The ordinal of a stale end entry the tailer stepped over (it reads on after it).
        self._skipped_end = -1
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._tail(), name=f"tail {topic.kind}"),
                      loop.create_task(self._lease_loop(), name=f"lease {topic.kind}")]

    # --- the tailer -------------------------------------------------------------------

    async def _tail(self) -> None:
        client = self.broker.client
        stream = client.keys.stream(self.topic.key)
        backoff = Backoff(0.1, 2.0)
        while not self.topic.ended:
            # Read after where the local topic is (not after the last entry read): events the
            # holder published here directly while Redis was away are not read twice, and a
            # stream that Redis lost and the next holder refilled is read from the right place.
            after = end_entry_id(self.ordinal) if self._skipped_end == self.ordinal else event_entry_id(self.ordinal)
            try:
                reply: Any = await client.call(lambda s=after: client.redis.xread(  # type: ignore[misc]
                    {stream: s}, count=1000, block=TAIL_BLOCK_MS))
            except (RedisError, OSError):
                await asyncio.sleep(backoff.next())
                continue
            except Exception:  # a bug here must not silently stop every subscriber of the stream
                log.exception("redis tail failed", extra={"stream_kind": self.topic.kind})
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            for _name, entries in reply or ():
                for entry_id, fields in entries:
                    if self.topic.ended:
                        break
                    ordinal = entry_ordinal(entry_id)
                    try:
                        self._apply(ordinal, fields)
                    except Exception:  # one bad entry is skipped, never read again in a loop
                        log.exception("redis entry skipped", extra={"stream_kind": self.topic.kind})
                        self.ordinal = max(self.ordinal, ordinal)

    def _apply(self, ordinal: int, fields: dict[str, str]) -> None:
        topic = self.topic
        if fields.get("k") == "x":
            reason = _REASONS.get(fields.get("c", ""))
            if reason is not None and reason.reconnect and _sent_at(fields) < self.started_at:
                # A feed failure worth retrying that happened before this topic existed: this topic is
                # the fresh attempt, and a holder resumes after the last event (it deletes this entry).
                self._skipped_end = ordinal
                return
            topic.end(reason or UPSTREAM_UNAVAILABLE if fields.get("c") else None, fields.get("m") or None)
            return
        if ordinal <= self.ordinal:
            return
        sent = _sent_at(fields)
        if sent:
            self.broker.metrics.tail_lag.observe(max(0.0, time.time() - sent))
        self._deliver(ordinal, Event(topic.key, fields.get("i", ""), fields.get("y", "message"),
                                     fields.get("d", ""), self.broker.clock()))

    def publish_locally(self, history: deque[tuple[int, Event]]) -> None:
        """Redis is down: the holder feeds its own subscribers straight from the upstream, in order.

        Only what follows the local topic without a hole: anything before it is in Redis, and the
        tailer delivers it (then the rest) when Redis is back.
        """
        for ordinal, event in self._newer(history):
            if ordinal != self.ordinal + 1:
                return
            self._publish(ordinal, event)

    def _newer(self, history: deque[tuple[int, Event]]) -> list[tuple[int, Event]]:
        """The entries of `history` past the local topic's position, oldest first."""
        newer: list[tuple[int, Event]] = []
        for entry in reversed(history):
            if entry[0] <= self.ordinal:
                break
            newer.append(entry)
        newer.reverse()
        return newer

    def _deliver(self, ordinal: int, event: Event) -> None:
        """Publish the event at `ordinal` into the local topic: each position once, in order."""
        if self.ordinal and ordinal > self.ordinal + 1:
            if self.sink is not None:
                # A holder's tailer that fell behind the trimmed stream still has the events itself.
                for held_ordinal, held in self._newer(self.sink.history):
                    if held_ordinal >= ordinal or held_ordinal != self.ordinal + 1:
                        break
                    self._publish(held_ordinal, held)
            if ordinal > self.ordinal + 1:
                # The stream no longer has the events in between, and nobody else can give them:
                # subscribers are told, and nobody may resume across the hole.
                log.warning("stream continuity lost", extra={
                    "stream_kind": self.topic.kind, "missing": ordinal - self.ordinal - 1})
                self.retained.clear()
                self.topic.lose_continuity("trimmed")
        self._publish(ordinal, event)

    def _publish(self, ordinal: int, event: Event) -> None:
        self.ordinal = ordinal
        if self.topic.already_has(event.id):
            return
        self.retained.append((ordinal, event))
        self.topic.publish(event)

    # --- the lease ----------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        broker = self.broker
        client = broker.client
        keys = client.keys
        ttl_ms = int(broker.config.lease_ttl * 1000)
        interval = broker.config.lease_ttl / 3
        holder = ""
        while not self.topic.ended:
            try:
                if self.sink is not None:
                    renewed = await client.call(lambda h=holder, k=self.topic.key: client.renew(  # type: ignore[misc]
                        keys=[keys.lease(k), keys.stream(k), keys.fence(k)], args=[h, ttl_ms, broker.keep_ms]))
                    if not renewed:
                        self.lost_lease()
                else:
                    holder = await self._try_acquire(ttl_ms)
            except (RedisError, OSError):
                pass  # health is tracked by the client; a holder keeps its feed meanwhile
            await asyncio.sleep(interval if self.sink is not None else interval / 2)

    async def _try_acquire(self, ttl_ms: int) -> str:
        broker = self.broker
        client = broker.client
        keys = client.keys
        key = self.topic.key
        acquired: Any = await client.call(lambda: client.acquire(
            keys=[keys.lease(key), keys.fence(key)],
            args=[broker.replica_id, secrets.token_hex(4), ttl_ms, broker.keep_ms]))
        if not acquired:
            return ""
        holder = str(acquired)
        fence = holder.split(":")[-2]
        entries: Any = list(await client.call(lambda: client.redis.xrevrange(keys.stream(key), count=2)) or ())
        last_id: str | None = None
        ordinal = 0
        if entries and entries[0][1].get("k") == "x":
            reason = _REASONS.get(entries[0][1].get("c", ""))
            if reason is None or not reason.reconnect:
                await client.call(lambda: client.release(keys=[keys.lease(key)], args=[holder]))
                return ""
            # The last feed failed in a way worth retrying: this holder resumes after the last event,
            # and the stale ending goes, so no newcomer is served it.
            stale = entries.pop(0)[0]
            await client.call(lambda: client.redis.xdel(keys.stream(key), stale))
        if entries:
            entry_id, fields = entries[0]
            if fields.get("y") in TERMINAL_EVENTS:
                await client.call(lambda: client.release(keys=[keys.lease(key)], args=[holder]))
                return ""
            last_id = fields.get("i") or None
            ordinal = entry_ordinal(entry_id)
            broker.metrics.lease_takeovers.inc()
        # Redis may have lost the stream (a restart without persistence) while this replica's topic
        # holds more: put that back first (other replicas may lack it: the old holder's direct
        # deliveries, entries not tailed yet), then resume upstream after it.
        backlog = [(held, event) for held, event in self.retained if held > ordinal]
        if backlog:
            ordinal, last_id = backlog[-1][0], backlog[-1][1].id
        log.info("lease acquired", extra={"stream_kind": self.topic.kind, "fence": fence,
                                          "resume": last_id is not None, "restored": len(backlog)})
        self.sink = _Sink(self, holder, last_id, ordinal, backlog)
        self.broker.metrics.leases_held.inc()
        self.broker.pool.attach(self.sink)
        return holder

    def lost_lease(self, sink: _Sink | None = None) -> None:
        """Stop feeding (another replica holds the lease, or ours expired).

        A writer passes its own sink: a stale writer must not stop a newer lease's feed.
        """
        if sink is not None and sink is not self.sink:
            return
        sink, self.sink = self.sink, None
        if sink is None:
            return
        log.warning("lease lost", extra={"stream_kind": self.topic.kind})
        self.broker.metrics.leases_held.dec()
        self.broker.spawn(self._stop_feed(sink, release=False))

    async def _stop_feed(self, sink: _Sink, release: bool) -> None:
        await self.broker.pool.detach(sink)
        await sink.aclose()
        if release:
            client = self.broker.client
            with contextlib.suppress(RedisError, OSError):
                await client.call(lambda: client.release(keys=[client.keys.lease(self.topic.key)],
                                                         args=[sink.holder]))

    async def finish_history(self) -> None:
        """The resource ended: keep its history `history_ttl` seconds, then let Redis forget it."""
        client = self.broker.client
        ttl = max(1, int(self.broker.limits.history_ttl))
        with contextlib.suppress(RedisError, OSError):
            await client.call(lambda: client.redis.expire(client.keys.stream(self.topic.key), ttl))
        sink, self.sink = self.sink, None
        if sink is not None:
            self.broker.metrics.leases_held.dec()
            with contextlib.suppress(RedisError, OSError):
                await client.call(lambda: client.release(keys=[client.keys.lease(self.topic.key)],
                                                         args=[sink.holder]))

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        sink, self.sink = self.sink, None
        if sink is not None:
            self.broker.metrics.leases_held.dec()
            await self._stop_feed(sink, release=True)


class RedisBroker:
    """The `Broker` for `broker.kind: redis`: leases, fenced appends and tailing per resource."""

    def __init__(self, config: BrokerConfig, limits: LimitsConfig, pool: Any, metrics: Metrics,
                 client: RedisClient | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.limits = limits
        self.pool = pool
        self.metrics = metrics
        self.clock = clock
        self.client = client or RedisClient(config, metrics, clock)
        self.replica_id = secrets.token_hex(6)
        self._sessions: dict[str, _Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()

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

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def attach(self, topic: Topic) -> None:
        previous = self._sessions.get(topic.key)
        self._sessions[topic.key] = _Session(self, topic)
        if previous is not None:  # the hub replaced an ended topic with a fresh attempt
            self.spawn(previous.aclose())

    async def detach(self, topic: Topic) -> None:
        session = self._sessions.get(topic.key)
        if session is None or session.topic is not topic:
            return
        del self._sessions[topic.key]
        await session.aclose()

    async def aclose(self) -> None:
        sessions = list(self._sessions.values())
        self._sessions.clear()
        await asyncio.gather(*(s.aclose() for s in sessions), return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()


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
        self._open: dict[tuple[str, str], tuple[str, Subscription]] = {}
        self._counter = 0

    def _owner(self) -> str:
        self._counter += 1
        return f"{self.owner_prefix}:{self._counter}"

    async def acquire(self, consumer: str, resource: str, sub: Subscription) -> None:
        from gateway.errors import LimitError

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

    async def release(self, consumer: str, resource: str, sub: Subscription) -> None:
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
