"""The holder's side of a shared stream: fenced, ordered appends of the upstream feed's events to Redis."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError, ResponseError

from gateway.broker.redis.keys import end_entry_id, event_entry_id
from gateway.codec.closes import CloseReason
from gateway.codec.events import Event
from gateway.codec.streams import is_decimal
from gateway.upstream.backoff import Backoff

if TYPE_CHECKING:
    from gateway.broker.redis.session import StreamSession

log = logging.getLogger("gateway.redis")

#: Most entries one fenced append carries.
MAX_BATCH = 256
_BEHIND = re.compile(r"BEHIND (\d+)")


class FencedWriter:
    """What the upstream feed writes to on the holder: fenced appends to the Redis Stream.

    It looks like a topic to the feed (last id, ordinal, publish, end) and keeps the
    upstream's order with a single writer task behind a queue. `backlog` is what the
    holder's own topic has beyond the stream's end (after Redis lost its data): it is
    appended first, so the shared log never misses what any replica may lack.
    """

    def __init__(self, session: StreamSession, holder: str, last_id: str | None, ordinal: int,
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
                args = [self.holder, maxlen, "1" if refuse_gap else "0", str(self.session.broker.keep_ms),
                        keys.appended_channel, self.key]
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


def sent_at(fields: dict[str, str]) -> float:
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
