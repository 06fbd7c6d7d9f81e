"""One subscriber's position in one topic: a cursor into the shared log and its owner's callbacks."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.codec.closes import SLOW_CONSUMER, CloseReason
from gateway.codec.events import Event
from gateway.hub.ports import DeliveryTally, DirectOutput

if TYPE_CHECKING:
    from gateway.hub.topic import Topic

log = logging.getLogger("gateway.hub")

#: Most events one write carries; bounds the bytes joined for a subscriber that is catching up.
MAX_EVENTS_PER_WRITE = 512


def _noop() -> None:
    return None


class Subscription:
    """One subscriber's position in one topic."""

    __slots__ = (
        "abort", "close_reason", "closed", "consumer", "continuity_lost", "cursor", "direct", "failed",
        "last_delivery", "last_write", "resume_id", "sending_since", "sent_bytes", "sent_events",
        "tally", "topic", "transport", "wake", "ws",
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
        #: Set by owners whose frames are the topic's joined bytes as they are (an SSE stream, a
        #: WebSocket connection): the topic's pass then writes them itself when this subscriber is
        #: caught up and nothing else is due (`Topic.flush`).
        self.direct: DirectOutput | None = None
        #: Direct writes take the WebSocket frames (`Event.ws_frame`) rather than SSE's.
        self.ws = False
        #: Which transport serves it (`sse`, `ws`), set by its owner once it streams; for the admin API.
        self.transport = ""
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
