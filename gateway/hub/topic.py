"""One resource's stream: a bounded log of events encoded once, and the subscriptions reading it.

A publish appends one pre-encoded event and queues one wake-up of the topic for the loop's
flush pass (however many events one upstream read carried); it never writes to a socket and
never waits for anyone. The pass (`Topic.flush`) writes the same joined bytes to every
caught-up subscriber with a direct output, and wakes the others to flush themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gateway.codec.closes import CloseReason
from gateway.codec.events import Event
from gateway.codec.streams import is_decimal, is_event_id, split_key
from gateway.hub.flush import FlushQueue
from gateway.hub.ports import DeliveryTally
from gateway.hub.subscription import MAX_EVENTS_PER_WRITE, Subscription


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
        self.kind, self.resource_id = split_key(key)
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
        #: The stream's first events were never here (see `starts_after_origin`).
        self.origin_missing = False
        self.paused = False
        self.linger_handle: asyncio.TimerHandle | None = None
        self.on_ended: Callable[[Topic], None] = lambda topic: None

    @property
    def last_id(self) -> str | None:
        return self.events[-1].id if self.events else None

    @property
    def from_origin(self) -> bool:
        """Whether the log still holds the stream's very first event."""
        return self.base == 0 and not self.origin_missing

    def starts_after_origin(self) -> None:
        """The first event this topic got is not its stream's first (it joined a shared log already trimmed)."""
        self.origin_missing = True

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
        if event.pause is not None:
            # A paused job is waiting on a human: it does not count towards the inactivity limit.
            self.paused = event.pause
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
        self.origin_missing = previous.origin_missing

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
            if self.events and not self.from_origin:
                # A late joiner is told that what follows is not the stream's beginning: no silent gap.
                return self.base, "truncated", False
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
