"""The fan-out engine: one shared, bounded log per stream and a cursor per subscriber.

A publish appends one pre-encoded event to the stream's log and queues one wake-up of its
subscribers for the loop's flush pass (however many events one upstream read carried); it
never writes to a socket and never waits for anyone. Each subscriber
pulls every pending frame in one piece (`Subscription.take`), so a busy stream costs
one write per subscriber per wake-up, not one per event. Subscribers that are in the
same place share the same joined bytes. A subscriber whose cursor falls out of the log
has fallen behind by more than `replay_buffer` events and is closed as a slow consumer;
it can resume by id.

The hub knows its feeds only through the `Broker` seam (in-process upstreams, or Redis)
and its subscribers only as a cursor plus two callbacks: `wake` and `abort`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from gateway.closes import SHUTTING_DOWN, SLOW_CONSUMER, TOKEN_EXPIRED, CloseReason
from gateway.config import LimitsConfig
from gateway.events import Event
from gateway.metrics import Metrics
from gateway.streams import PAUSE_EVENT, RESUME_EVENT, is_decimal, is_event_id

log = logging.getLogger("gateway.hub")
#: Most events one write carries; bounds the bytes joined for a subscriber that is catching up.
MAX_EVENTS_PER_WRITE = 512


class Broker(Protocol):
    """What feeds topics: the in-process upstream pool, or the Redis broker."""

    def attach(self, topic: Topic) -> None:
        """Start feeding `topic` (it has just been created for its first subscriber)."""

    async def detach(self, topic: Topic) -> None:
        """Stop feeding `topic` (its last subscriber left and `linger` passed, or the hub closes)."""


class StreamUnavailable(Exception):
    """The hub cannot open another stream right now (stream cap reached)."""


def _noop() -> None:
    return None


class DirectOutput(Protocol):
    """A subscriber's socket the topic's pass may write the shared bytes to itself."""

    @property
    def paused(self) -> bool:
        """It cannot take a write from the pass now (a full socket, or its owner is busy)."""

    def write(self, data: bytes) -> None: ...


class DeliveryTally(Protocol):
    """Who counts a topic pass's direct writes (once per pass, not once per subscriber)."""

    def delivered(self, writes: int, batch: list[Event]) -> None: ...


class Subscription:
    """One subscriber's position in one topic."""

    __slots__ = (
        "abort", "close_reason", "closed", "consumer", "continuity_lost", "cursor", "deadline", "direct", "failed",
        "last_delivery", "last_write", "paused_exempt", "resume_id", "sending_since", "sent_bytes", "sent_events",
        "tally", "topic", "wake", "ws",
    )

    def __init__(self, topic: Topic, cursor: int, now: float, consumer: str = "") -> None:
        self.topic = topic
        self.cursor = cursor
        self.consumer = consumer
        self.wake: Callable[[], None] = _noop
        self.abort: Callable[[], None] = _noop
        self.close_reason: CloseReason | None = None
        self.closed = False
        self.continuity_lost: str | None = None
        self.resume_id: str | None = None
        self.last_delivery = now
        self.last_write = now
        self.sending_since = 0.0
        #: When the subscriber's credentials expire (hub clock); the sweep closes it as `token_expired`.
        self.deadline = math.inf
        self.paused_exempt = False
        #: Set by owners whose frames are the topic's joined bytes as they are (an SSE stream, a
        #: WebSocket connection): the topic's pass then writes them itself when this subscriber is
        #: caught up and nothing else is due (`Topic.flush`).
        self.direct: DirectOutput | None = None
        #: Direct writes take the WebSocket frames (`Event.ws_frame`) rather than SSE's.
        self.ws = False
        self.tally: DeliveryTally | None = None
        self.sent_events = 0
        self.sent_bytes = 0
        #: One of its owner's callbacks raised: it is cut off and skipped from then on (`fail`).
        self.failed = False

    @property
    def pending(self) -> bool:
        """Waiting for its resume id to arrive (the stream is replaying from the start)."""
        return self.resume_id is not None

    def _has_pending(self) -> bool:
        """Whether events wait after the cursor; a cursor that fell out of the log closes as slow."""
        if self.resume_id is not None:
            return False
        if self.cursor < self.topic.base:
            self.close(SLOW_CONSUMER)
            return False
        return self.cursor < self.topic.head

    def take(self, ws: bool = False) -> tuple[bytes, list[Event]] | None:
        """Every frame after the cursor (up to a bound), advancing it; None if there is nothing."""
        if not self._has_pending():
            return None
        chunk, events, self.cursor = self.topic.chunk(self.cursor, ws)
        return chunk, events

    def take_events(self) -> list[Event] | None:
        """Like `take`, for transports that send one message per event (no joined frames)."""
        if not self._has_pending():
            return None
        start = self.cursor - self.topic.base
        events = self.topic.events[start:start + MAX_EVENTS_PER_WRITE]
        self.cursor += len(events)
        return events

    @property
    def drained(self) -> bool:
        return self.resume_id is None and self.cursor >= self.topic.head

    def close(self, reason: CloseReason | None) -> None:
        """End this subscription with `reason` (None: the client went away); the owner writes the goodbye."""
        if self.close_reason is None and not self.closed:
            self.close_reason = reason
        self.closed = True
        self.notify()

    def notify(self) -> None:
        """Wake the owner; a wake-up that raises cuts off this subscriber alone (`fail`)."""
        try:
            self.wake()
        except Exception:
            self.fail("wake")

    def fail(self, during: str) -> None:
        """One of this subscriber's own callbacks raised: disconnect it, and only it.

        Topics, publishes, flush passes and tailers are shared by every subscriber of a
        stream; an exception from one subscriber's socket or state must stay with it.
        The connection is dropped (the client reconnects and resumes by id) and the hub
        never calls into this subscriber again.
        """
        if self.failed:
            return
        self.failed = True
        self.closed = True
        self.direct = None
        log.exception("subscriber failed; disconnecting it", extra={"stream_kind": self.topic.kind,
                                                                     "during": during})
        abort, self.abort, self.wake = self.abort, _noop, _noop
        try:
            abort()
        except Exception:
            log.exception("subscriber abort failed", extra={"stream_kind": self.topic.kind})

    def last_id(self) -> str | None:
        """The id of the last event this subscriber was given (its resume point)."""
        topic = self.topic
        index = self.cursor - 1 - topic.base
        if 0 <= index < len(topic.events):
            return topic.events[index].id
        return None


class Topic:
    """One resource's stream: a bounded log of encoded events and the subscriptions reading it."""

    def __init__(self, key: str, capacity: int, clock: Callable[[], float] = time.monotonic,
                 chunk_bytes: int = 1 << 20, flushes: FlushQueue | None = None) -> None:
        self.key = key
        #: Where publishes defer waking the subscribers (one pass per loop iteration, however many
        #: events one upstream read carried); without one, every publish wakes them at once.
        self._flushes = flushes
        self._wake_queued = False
        #: Where every caught-up subscriber stood after the last pass (the next pass's common start).
        self._passed = 0
        self.kind, _, self.resource_id = key.partition("/")
        self.capacity = capacity
        self.events: list[Event] = []
        self._frames: list[bytes] = []
        self._ids: dict[str, int] = {}
        self._cache: dict[int, tuple[bytes, list[Event], int]] = {}
        self._ws_cache: dict[int, tuple[bytes, list[Event], int]] = {}
        self._chunk_bytes = chunk_bytes
        self.base = 0
        #: The position after the newest event (`base + len(events)`), kept as a plain attribute
        #: because every subscriber reads it on every wake-up.
        self.head = 0
        self.subscribers: set[Subscription] = set()
        self.pending: list[Subscription] = []
        self.ended = False
        self.end_reason: CloseReason | None = None
        self.end_detail: str | None = None
        self.clock = clock
        self.last_event_at = clock()
        self.ordinal = 0
        #: Approximate memory of the retained log (each event's SSE frame and data).
        self.bytes = 0
        self.paused = False
        self.linger_handle: asyncio.TimerHandle | None = None
        self.on_ended: Callable[[Topic], None] = lambda topic: None

    @property
    def last_id(self) -> str | None:
        return self.events[-1].id if self.events else None

    @property
    def from_origin(self) -> bool:
        """Whether the log still holds the stream's very first event."""
        return self.base == 0

    def has_id(self, event_id: str) -> bool:
        return event_id in self._ids

    def already_has(self, event_id: str) -> bool:
        """Whether an event replayed by a feed after a reconnect was published already.

        Integer ids compare by value (so anything at or before the last id is old news even
        when it was trimmed from the log); other ids by membership.
        """
        last = self.last_id
        if last is None:
            return False
        if is_decimal(event_id) and is_decimal(last):
            return int(event_id) <= int(last)
        return event_id in self._ids

    def publish(self, event: Event) -> None:
        """Append an event and wake every idle subscriber. Never blocks."""
        if self.ended:
            return
        seq = self.head
        self.head = seq + 1
        self.events.append(event)
        self._frames.append(event.sse)
        self._ids[event.id] = seq
        self.ordinal += 1
        self.bytes += len(event.sse) + len(event.data)
        self.last_event_at = self.clock()
        if len(self.events) > self.capacity + max(1, self.capacity // 4):
            self._trim()
        if self._cache:
            self._cache.clear()
        if self._ws_cache:
            self._ws_cache.clear()
        if self.pending:
            self._resolve_pending(event, seq)
        if event.type == PAUSE_EVENT or event.type == RESUME_EVENT:
            # A paused job is waiting on a human: it does not count towards the inactivity limit.
            self.paused = event.type == PAUSE_EVENT
        if event.terminal:
            self.ended = True
            self._lose_pending()
            self.on_ended(self)
        if self._flushes is None:
            self.wake_all()
        elif not self._wake_queued:
            self._wake_queued = True
            self._flushes.add(self)

    def flush(self) -> None:
        """The deferred wake-up of `publish` (a `FlushQueue` item): one pass over the subscribers.

        A subscriber with a `direct` output that stood where the last pass left everyone, and
        has nothing else due (no goodbye, no continuity notice, a socket with room), gets the
        new frames written here, the same bytes for all (SSE's, or the WebSocket frames);
        everyone else is woken to flush itself. This is the fan-out's hot loop: a few
        attribute checks and one write each.
        """
        self._wake_queued = False
        start, head = self._passed, self.head
        self._passed = head
        if self.ended or not self.base <= start < head:
            self.wake_all()
            return
        chunk, batch, end = self.chunk(start)
        if end != head:  # more than one write's worth: owners take it in pieces
            self.wake_all()
            return
        count = len(batch)
        frames: bytes | None = None  # the WebSocket frames, joined on first use
        now = self.clock()
        tally: DeliveryTally | None = None
        writes = 0
        for sub in self.subscribers:
            try:
                out = sub.direct
                if (out is None or sub.cursor != start or out.paused or sub.closed or sub.continuity_lost is not None
                        or sub.resume_id is not None):
                    if not sub.failed:
                        sub.wake()
                    continue
                data = chunk
                if sub.ws:
                    if frames is None:
                        frames, _, ws_end = self.chunk(start, True)
                        if ws_end != head:
                            frames = b""
                    if not frames:
                        sub.wake()
                        continue
                    data = frames
                sub.cursor = head
                out.write(data)
                sub.last_delivery = sub.last_write = now
                sub.sent_events += count
                sub.sent_bytes += len(data)
                if out.paused and not sub.sending_since:
                    sub.sending_since = now
                if sub.tally is not tally:
                    if tally is not None:
                        tally.delivered(writes, batch)
                    tally, writes = sub.tally, 0
                writes += 1
            except Exception:
                sub.fail("flush")
        if tally is not None:
            tally.delivered(writes, batch)

    def wake_all(self) -> None:
        for sub in self.subscribers:
            if not sub.failed:
                sub.notify()

    def end(self, reason: CloseReason | None = None, detail: str | None = None) -> None:
        """No more events will come: a terminal event passed, or the upstream failed for good."""
        if self.ended and reason is None:
            return
        self.ended = True
        if reason is not None and self.end_reason is None:
            self.end_reason = reason
            self.end_detail = detail
        self._lose_pending()
        self.on_ended(self)
        self.wake_all()

    def lose_continuity(self, reason: str = "trimmed") -> None:
        """The feed cannot deliver some events before the next one (they are gone for good).

        Nobody may resume across the hole, so the retained history is dropped as if trimmed, and
        every subscriber is told (`continuity_lost`) before the next event; pending ones resolve on it.
        """
        for event in self.events:
            self._ids.pop(event.id, None)
        self.base = self._passed = self.head
        self.bytes = 0
        self.events.clear()
        self._frames.clear()
        self._cache.clear()
        self._ws_cache.clear()
        for sub in self.subscribers:
            if sub.resume_id is None:
                sub.cursor = self.head
                sub.continuity_lost = reason
                sub.notify()

    def _lose_pending(self) -> None:
        """The stream is over and the ids they wait for never came: they get the history instead."""
        for sub in self.pending:
            sub.resume_id = None
            sub.continuity_lost = "unknown"
            sub.cursor = self.base
        self.pending.clear()

    def adopt(self, previous: Topic) -> None:
        """Start from the retained log of the topic this one replaces (a stream retried after a failure).

        Subscribers resume against the same ids, and the new feed resumes the upstream after
        the last of them instead of replaying the stream from its start.
        """
        self.events = list(previous.events)
        self._frames = list(previous._frames)
        self._ids = dict(previous._ids)
        self.base, self.head, self._passed = previous.base, previous.head, previous.head
        self.ordinal = previous.ordinal
        self.bytes = previous.bytes

    def _trim(self) -> None:
        drop = len(self.events) - self.capacity
        for event in self.events[:drop]:
            self._ids.pop(event.id, None)
            self.bytes -= len(event.sse) + len(event.data)
        del self.events[:drop]
        del self._frames[:drop]
        self.base += drop

    def _resolve_pending(self, event: Event, seq: int) -> None:
        still: list[Subscription] = []
        for sub in self.pending:
            wanted = sub.resume_id
            if wanted == event.id:
                sub.resume_id = None
                sub.cursor = seq + 1
            elif wanted is not None and is_decimal(wanted) and is_decimal(event.id) and int(event.id) > int(wanted):
                sub.resume_id = None
                sub.continuity_lost = "unknown"
                sub.cursor = self.base
            else:
                still.append(sub)
        self.pending = still

    def position(self, after_id: str | None) -> tuple[int, str | None, bool]:
        """Where a subscriber resuming after `after_id` starts: (cursor, continuity_lost, pending)."""
        if after_id is None:
            return self.base, None, False
        if not is_event_id(after_id):
            return self.base, "unknown", False  # malformed: it can never come by, so nobody waits for it
        seq = self._ids.get(after_id)
        if seq is not None:
            return seq + 1, None, False
        if self.from_origin and not self.ended:
            return self.base, None, True
        if not self.from_origin and self.events:
            first, last = self.events[0].id, self.events[-1].id
            decimal = is_decimal(after_id)
            if decimal and is_decimal(first) and int(after_id) < int(first):
                return self.base, "trimmed", False
            if decimal and is_decimal(last) and int(after_id) > int(last) and not self.ended:
                # Ahead of this log (a replica that lags the one the client came from): wait for it.
                return self.head, None, True
        return self.base, "unknown", False

    def chunk(self, cursor: int, ws: bool = False) -> tuple[bytes, list[Event], int]:
        """The joined frames from `cursor` (SSE, or WebSocket frames), shared by every subscriber there."""
        cache = self._ws_cache if ws else self._cache
        cached = cache.get(cursor)
        if cached is not None:
            return cached
        start = cursor - self.base
        stop = min(len(self.events), start + MAX_EVENTS_PER_WRITE)
        frames = [event.ws_frame for event in self.events[start:stop]] if ws else self._frames[start:stop]
        size = 0
        for i, frame in enumerate(frames):
            size += len(frame)
            if size > self._chunk_bytes and i > 0:
                stop = start + i
                frames = frames[:i]
                break
        result = (b"".join(frames), self.events[start:stop], self.base + stop)
        cache[cursor] = result
        return result


class Flushable(Protocol):
    def flush(self) -> None: ...


class FlushQueue:
    """Work deferred to one pass per event-loop iteration.

    A publish queues its topic here instead of waking every subscriber per event, and an
    idle subscriber's `wake` queues it here instead of waking a task of its own. The pass
    runs after every event of the current upstream read was published, so one wake-up and
    one write per subscriber carry all of them, with no future and no task switch per
    subscriber. Items queued during the pass (the subscribers a topic woke) run in it too.
    """

    #: Passes over newly queued items in one run before the rest waits for the next iteration.
    ROUNDS = 4

    def __init__(self) -> None:
        self._pending: list[Flushable] = []
        self._scheduled = False

    def add(self, item: Flushable) -> None:
        self._pending.append(item)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        try:
            for _ in range(self.ROUNDS):
                pending, self._pending = self._pending, []
                for item in pending:
                    try:
                        item.flush()
                    except Exception:  # one broken subscriber must not starve the others
                        log.exception("flush failed")
                if not self._pending:
                    break
        finally:
            self._scheduled = False
            if self._pending:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._run)


class Hub:
    """Topics by key, created on first subscribe and fed through the broker."""

    def __init__(self, limits: LimitsConfig, broker: Broker, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.broker = broker
        self.metrics = metrics
        self.clock = clock
        self.topics: dict[str, Topic] = {}
        #: The one deferred pass per loop iteration that every topic and stream shares.
        self.flushes = FlushQueue()
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Topics counted in `gateway_upstream_streams`: created and not yet ended or dropped. These are
        #: the live upstream feeds that `limits.max_streams` caps.
        self._feeding: set[Topic] = set()
        #: Ended topics kept for late resumes, oldest first, with the bytes they hold: bounded in
        #: total by `limits.ended_history_bytes` (and each by `limits.history_ttl`).
        self._ended: dict[Topic, int] = {}
        self._ended_bytes = 0
        metrics.watch_streams(self._open_stream_ages, clock)

    def _open_stream_ages(self) -> Iterable[tuple[str, float]]:
        for topic in list(self.topics.values()):
            if not topic.ended and topic.subscribers:
                yield topic.kind, topic.last_event_at

    def subscribe(self, key: str, after_id: str | None = None, consumer: str = "") -> Subscription:
        """Join the topic for `key`, creating it (and its single upstream) if needed."""
        topic = self.topics.get(key)
        previous: Topic | None = None
        if topic is not None and topic.ended and topic.end_reason is not None and topic.end_reason.reconnect:
            # The feed failed in a way worth retrying: a newcomer gets a fresh upstream attempt, not the
            # old ending. The old topic's subscribers still get their goodbye from it.
            previous, topic = topic, None
        if topic is None:
            if self._closing or len(self._feeding) >= self.limits.max_streams:
                raise StreamUnavailable("the gateway is at its stream limit")
            if previous is not None:
                self._retire(previous)
            topic = Topic(key, self.limits.replay_buffer, self.clock, self.limits.subscriber_buffer, self.flushes)
            if previous is not None:
                topic.adopt(previous)
            topic.on_ended = self.topic_ended
            self.topics[key] = topic
            self.metrics.upstream_streams.labels(topic.kind).inc()
            self._feeding.add(topic)
            self.broker.attach(topic)
        if topic.linger_handle is not None:
            topic.linger_handle.cancel()
            topic.linger_handle = None
        cursor, lost, pending = topic.position(after_id)
        sub = Subscription(topic, cursor, self.clock(), consumer)
        if after_id is not None:
            outcome = "continuity_lost" if lost else ("pending" if pending else "hit")
            self.metrics.replays.labels(outcome).inc()
        sub.continuity_lost = lost
        if pending:
            sub.resume_id = after_id
            topic.pending.append(sub)
        topic.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Leave; the topic's upstream lingers for `limits.linger` seconds after its last subscriber."""
        topic = sub.topic
        sub.closed = True
        topic.subscribers.discard(sub)
        if sub in topic.pending:
            topic.pending.remove(sub)
        if topic.subscribers or self.topics.get(topic.key) is not topic:
            return
        if topic.ended and topic.head == 0:
            self._drop(topic)  # refused or empty: nothing to keep for a late resume
            return
        delay = self.limits.history_ttl if topic.ended else self.limits.linger
        loop = asyncio.get_running_loop()
        topic.linger_handle = loop.call_later(delay, self._expire, topic)

    def _expire(self, topic: Topic) -> None:
        topic.linger_handle = None
        if topic.subscribers or self.topics.get(topic.key) is not topic:
            return
        self._drop(topic)

    def _retire(self, topic: Topic) -> None:
        """Take a topic out of the registry now (its subscribers finish on it)."""
        if topic.linger_handle is not None:
            topic.linger_handle.cancel()
            topic.linger_handle = None
        if self.topics.get(topic.key) is topic:
            self._drop(topic)

    def _drop(self, topic: Topic) -> None:
        del self.topics[topic.key]
        self._stop_counting(topic)
        held = self._ended.pop(topic, None)
        if held is not None:
            self._ended_bytes -= held
        task = asyncio.get_running_loop().create_task(self.broker.detach(topic))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def topic_ended(self, topic: Topic) -> None:
        """Called by feeds when a topic ends; idle ended topics are kept `history_ttl` for late resumes.

        Its upstream slot is free at once. A topic that never had an event (the upstream refused
        it) keeps nothing; the others' histories are bounded together by `ended_history_bytes`,
        the oldest unread ones evicted first.
        """
        self._stop_counting(topic)
        if self.topics.get(topic.key) is not topic:
            return
        if topic.head == 0:
            if not topic.subscribers:
                self._retire(topic)
            return
        if topic not in self._ended:
            self._ended[topic] = topic.bytes
            self._ended_bytes += topic.bytes
            self._evict_histories()
        if not topic.subscribers and topic.linger_handle is None and self.topics.get(topic.key) is topic:
            loop = asyncio.get_running_loop()
            topic.linger_handle = loop.call_later(self.limits.history_ttl, self._expire, topic)

    def _evict_histories(self) -> None:
        while self._ended_bytes > self.limits.ended_history_bytes:
            victim = next((t for t in self._ended if not t.subscribers), None)
            if victim is None:
                return
            self._retire(victim)

    def _stop_counting(self, topic: Topic) -> None:
        # An ended topic keeps its history for late resumes, but its upstream stream is over.
        if topic in self._feeding:
            self._feeding.discard(topic)
            self.metrics.upstream_streams.labels(topic.kind).dec()

    def sweep(self) -> None:
        """Abort subscribers stuck in one write for longer than `limits.send_timeout`; end expired ones.

        One pass a second for every subscriber is cheaper than a timer each (a timer costs
        more memory than the rest of an idle subscriber).
        """
        now = self.clock()
        timeout = self.limits.send_timeout
        for topic in list(self.topics.values()):
            for sub in list(topic.subscribers):
                if sub.sending_since and now - sub.sending_since > timeout:
                    sub.close(SLOW_CONSUMER)
                    try:
                        sub.abort()
                    except Exception:
                        sub.fail("abort")
                elif sub.deadline <= now:
                    sub.close(TOKEN_EXPIRED)

    def tick(self) -> None:
        """Wake every subscriber so idle ones send a heartbeat or notice the inactivity limit."""
        for topic in list(self.topics.values()):
            topic.wake_all()

    async def run_ticker(self) -> None:
        """One clock for every subscriber: a sweep each second, a heartbeat wake-up each `heartbeat`."""
        interval = min(self.limits.heartbeat, 1.0)
        next_beat = self.clock() + self.limits.heartbeat
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep()
                if self.clock() >= next_beat:
                    next_beat = self.clock() + self.limits.heartbeat
                    self.tick()
            except Exception:  # pragma: no cover - a bug here must not stop heartbeats
                log.exception("hub tick failed")

    def close_all(self, reason: CloseReason = SHUTTING_DOWN) -> int:
        """End every subscription (start of a drain); returns how many were told."""
        self._closing = True
        count = 0
        for topic in list(self.topics.values()):
            for sub in list(topic.subscribers):
                sub.close(reason)
                count += 1
        return count

    async def aclose(self) -> None:
        """Stop every feed (after the drain)."""
        self._closing = True
        for topic in list(self.topics.values()):
            if topic.linger_handle is not None:
                topic.linger_handle.cancel()
            self._drop(topic)
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._tasks, return_exceptions=True)
