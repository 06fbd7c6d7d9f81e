"""One shared stream on one replica: a tailer into the local topic, and a lease loop that may run its feed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from gateway.broker.redis.keys import end_entry_id, entry_ordinal, event_entry_id
from gateway.broker.redis.writer import FencedWriter, sent_at
from gateway.codec.closes import CATALOGUE, UPSTREAM_UNAVAILABLE
from gateway.codec.events import Event
from gateway.codec.streams import TERMINAL_EVENTS
from gateway.hub.topic import Topic
from gateway.upstream.backoff import Backoff

if TYPE_CHECKING:
    from gateway.broker.redis.broker import RedisBroker

log = logging.getLogger("gateway.redis")

#: Most entries one read of a stream's log carries.
TAIL_BATCH = 1000
#: Seconds between two reads of an idle stream's log when no notice came (a notice lost in a reconnect).
TAIL_SAFETY_READ = 5.0
#: The share of `broker.lease_ttl` a holder gives up early: it stops its feed by its own clock this long
#: before the lease could expire in Redis, so the upstream never sees two streams for one resource.
LEASE_SAFETY_MARGIN = 0.25
_REASONS = {reason.code: reason for reason in CATALOGUE}


class StreamSession:
    """One resource on one replica: a tailer, and a lease loop that may run the upstream feed."""

    def __init__(self, broker: RedisBroker, topic: Topic) -> None:
        self.broker = broker
        self.topic = topic
        self.sink: FencedWriter | None = None
        #: Position (in the resource's sequence) of the last event published into the local topic.
        self.ordinal = 0
        #: What the local topic retains, with positions: a new holder restores it to a Redis that lost it.
        self.retained: deque[tuple[int, Event]] = deque(maxlen=broker.limits.replay_buffer)
        #: Wall-clock creation time: ends that a retried stream's log still holds from before are stale.
        self.started_at = time.time()
        #: The ordinal of a stale end entry the tailer stepped over (it reads on after it).
        self._skipped_end = -1
        #: Set by an append notice (or a reconnect of the notices): the log may have grown.
        self._moved = asyncio.Event()
        self._moved.set()
        #: Until when (monotonic) this replica's lease is certainly still its own; see `_watch_lease`.
        self.lease_deadline = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._tail(), name=f"tail {topic.kind}"),
                      loop.create_task(self._lease_loop(), name=f"lease {topic.kind}")]

    # --- the tailer -------------------------------------------------------------------

    def poke(self) -> None:
        """The stream's log may have grown (an append notice): read it."""
        self._moved.set()

    async def _tail(self) -> None:
        """Read the log whenever it may have moved; no blocking read, so no connection per stream."""
        client = self.broker.client
        stream = client.keys.stream(self.topic.key)
        backoff = Backoff(0.1, 2.0)
        while not self.topic.ended:
            with contextlib.suppress(TimeoutError):
                # Woken by a notice; a slow safety read catches a notice lost while Redis was away.
                await asyncio.wait_for(self._moved.wait(), timeout=TAIL_SAFETY_READ)
            self._moved.clear()
            while not self.topic.ended:
                # Read after where the local topic is (not after the last entry read): events the
                # holder published here directly while Redis was away are not read twice, and a
                # stream that Redis lost and the next holder refilled is read from the right place.
                after = end_entry_id(self.ordinal) if self._skipped_end == self.ordinal else \
                    event_entry_id(self.ordinal)
                try:
                    entries: Any = await client.call(lambda s=after: client.redis.xrange(  # type: ignore[misc]
                        stream, min=f"({s}", count=TAIL_BATCH))
                except (RedisError, OSError):
                    self._moved.set()  # read again once Redis answers
                    await asyncio.sleep(backoff.next())
                    break
                except Exception:  # a bug here must not silently stop every subscriber of the stream
                    log.exception("redis tail failed", extra={"stream_kind": self.topic.kind})
                    await asyncio.sleep(backoff.next())
                    break
                backoff.reset()
                for entry_id, fields in entries or ():
                    if self.topic.ended:
                        break
                    ordinal = entry_ordinal(entry_id)
                    try:
                        self._apply(ordinal, fields)
                    except Exception:  # one bad entry is skipped, never read again in a loop
                        log.exception("redis entry skipped", extra={"stream_kind": self.topic.kind})
                        self.ordinal = max(self.ordinal, ordinal)
                if len(entries or ()) < TAIL_BATCH:
                    break

    def _apply(self, ordinal: int, fields: dict[str, str]) -> None:
        topic = self.topic
        if fields.get("k") == "x":
            reason = _REASONS.get(fields.get("c", ""))
            if reason is not None and reason.reconnect and sent_at(fields) < self.started_at:
                # A feed failure worth retrying that happened before this topic existed: this topic is
                # the fresh attempt, and a holder resumes after the last event (it deletes this entry).
                self._skipped_end = ordinal
                return
            topic.end(reason or UPSTREAM_UNAVAILABLE if fields.get("c") else None, fields.get("m") or None)
            return
        if ordinal <= self.ordinal:
            return
        sent = sent_at(fields)
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
        if not self.ordinal and ordinal > 1 and not self.topic.events:
            self.topic.starts_after_origin()  # the shared log was trimmed before this replica joined
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
        ttl = broker.config.lease_ttl
        ttl_ms = int(ttl * 1000)
        interval = ttl / 4
        holder = ""
        while not self.topic.ended:
            started = self.broker.clock()
            try:
                if self.sink is not None:
                    renewed = await client.call(lambda h=holder, k=self.topic.key: client.renew(  # type: ignore[misc]
                        keys=[keys.lease(k), keys.stream(k), keys.fence(k)], args=[h, ttl_ms, broker.keep_ms]))
                    if renewed:
                        self._watch_lease(started)
                    else:
                        self.lost_lease()
                else:
                    holder = await self._try_acquire(ttl_ms, started)
            except (RedisError, OSError):
                pass  # health is tracked by the client; the watchdog stops the feed in time
            await asyncio.sleep(interval if self.sink is not None else interval / 2)

    def _watch_lease(self, asked_at: float) -> None:
        """The lease is ours until `asked_at + lease_ttl` at least (Redis set its TTL after we asked).

        If no renewal succeeds before that, minus a safety margin, the feed stops by this
        process's own monotonic clock, whatever Redis is doing (stalled, restarting, failing over,
        or out of reach): nobody else can take the lease before it expires in Redis, so the
        upstream never sees a second stream for this resource.
        """
        ttl = self.broker.config.lease_ttl
        self.lease_deadline = asked_at + ttl * (1 - LEASE_SAFETY_MARGIN)
        if self._watchdog is not None:
            self._watchdog.cancel()
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(max(0.0, self.lease_deadline - self.broker.clock()), self._lease_expiring)

    def _lease_expiring(self) -> None:
        self._watchdog = None
        if self.sink is not None and self.broker.clock() >= self.lease_deadline - 0.01:
            log.warning("lease not renewed in time; stopping the upstream feed", extra={
                "stream_kind": self.topic.kind})
            self.lost_lease()

    async def _try_acquire(self, ttl_ms: int, asked_at: float) -> str:
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
        if self.broker.clock() >= asked_at + self.broker.config.lease_ttl * (1 - LEASE_SAFETY_MARGIN):
            return ""  # acquiring took so long that the lease may be gone already: let it expire
        log.info("lease acquired", extra={"stream_kind": self.topic.kind, "fence": fence,
                                          "resume": last_id is not None, "restored": len(backlog)})
        self._watch_lease(asked_at)
        self.sink = FencedWriter(self, holder, last_id, ordinal, backlog)
        self.broker.metrics.leases_held.inc()
        self.broker.pool.attach(self.sink)
        return holder

    def lost_lease(self, sink: FencedWriter | None = None) -> None:
        """Stop feeding (another replica holds the lease, or ours expired).

        A writer passes its own sink: a stale writer must not stop a newer lease's feed.
        """
        if sink is not None and sink is not self.sink:
            return
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        log.warning("lease lost", extra={"stream_kind": self.topic.kind})
        self.broker.metrics.leases_held.dec()
        self.broker.spawn(self._stop_feed(sink, release=False))

    async def _stop_feed(self, sink: FencedWriter, release: bool) -> None:
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
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        sink, self.sink = self.sink, None
        if sink is not None:
            self.broker.metrics.leases_held.dec()
            await self._stop_feed(sink, release=True)
