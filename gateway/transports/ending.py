"""When a stream ends and why, the same for SSE and WebSocket; and the one clock for token expiry.

`ending(sub, now, inactivity)` says whether a subscription must end now: its owner or the
hub closed it (superseded, drain, slow consumer, token expiry...), its stream ended and it
has read everything, or it saw no event for `limits.inactivity_timeout` (a paused job
excepted). `continuity_notice(sub)` is the one-time notice that a resume position could not
be honoured. The transports only encode these: SSE as `gateway.close` and
`gateway.continuity_lost` events, WebSocket as `error` messages (or the socket's close code).

`Expiries` is how every stream and socket learns that its token expired: one timer for all of
them, so an idle subscriber costs a heap entry rather than a timer of its own.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.codec.closes import INACTIVITY_TIMEOUT, CloseReason
from gateway.codec.streams import POLLABLE_KINDS
from gateway.hub.subscription import Subscription

log = logging.getLogger("gateway.transports")


@dataclass(frozen=True, slots=True)
class Ending:
    """Why a subscription ends now. `reason` None: its stream ended normally, or the client left."""

    reason: CloseReason | None
    detail: str | None = None
    #: Where to poll instead (after an inactivity close of a pollable stream).
    poll: str | None = None
    #: The subscriber's resume point.
    last_event_id: str | None = None


def poll_url(sub: Subscription) -> str | None:
    topic = sub.topic
    return f"/api/v1/{topic.kind}/{topic.resource_id}" if topic.kind in POLLABLE_KINDS else None


def ending(sub: Subscription, now: float, inactivity_timeout: float) -> Ending | None:
    """What ends `sub` now, if anything; an inactive subscription is closed here (`inactivity_timeout`)."""
    if not sub.closed:
        topic = sub.topic
        if topic.ended and sub.drained:
            return Ending(topic.end_reason, topic.end_detail, None, sub.last_id())
        if now - sub.last_delivery < inactivity_timeout or topic.paused:
            return None  # a paused job waits on a person: its browser must stay to see job_resumed
        sub.close(INACTIVITY_TIMEOUT)
    reason = sub.close_reason
    return Ending(reason, None, poll_url(sub) if reason is INACTIVITY_TIMEOUT else None, sub.last_id())


def continuity_notice(sub: Subscription) -> tuple[str, str | None] | None:
    """(reason, oldest retained id) if `sub` must be told that its position was lost; told once per hole."""
    reason = sub.continuity_lost
    if not reason:
        return None
    sub.continuity_lost = None
    events = sub.topic.events
    return reason, events[0].id if events else None


class Expiry:
    """One registered deadline; `cancel` when its stream or socket ends, `move` when its token is refreshed."""

    __slots__ = ("_owner", "callback", "due")

    def __init__(self, owner: Expiries, due: float, callback: Callable[[], None]) -> None:
        self._owner = owner
        self.due = due
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self._owner.stale += 1

    def move(self, valid_until: float) -> None:
        """The credential now expires at `valid_until` (wall clock)."""
        if self.callback is not None:
            self._owner.stale += 1
            self._owner.push(self, valid_until)


class Expiries:
    """Every credential deadline (SSE streams and WebSocket sockets alike) on one timer.

    Deadlines are wall-clock instants (`exp + leeway`) turned into the monotonic clock when
    registered. Cancelled and moved entries are dropped lazily, and the heap is rebuilt when
    they outnumber the live ones, so churn never grows it without bound.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.wall_clock = wall_clock
        self._heap: list[tuple[float, int, Expiry]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        #: Heap entries that no longer fire (cancelled, or moved elsewhere).
        self.stale = 0

    def __len__(self) -> int:
        return len(self._heap) - self.stale

    def schedule(self, valid_until: float, callback: Callable[[], None]) -> Expiry:
        """Call `callback` once the wall clock passes `valid_until` (unless cancelled or moved)."""
        expiry = Expiry(self, 0.0, callback)
        self.push(expiry, valid_until)
        return expiry

    def push(self, expiry: Expiry, valid_until: float) -> None:
        due = self.clock() + max(0.0, valid_until - self.wall_clock())
        expiry.due = due
        heapq.heappush(self._heap, (due, next(self._order), expiry))
        if self.stale > 64 and self.stale * 2 > len(self._heap):
            self._compact()
        if due < self._timer_at:
            self._arm(due)

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if entry[2].callback is not None and entry[2].due == entry[0]]
        heapq.heapify(self._heap)
        self.stale = 0

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = due
        self._timer = loop.call_at(loop.time() + max(0.0, due - self.clock()), self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = self.clock()
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, _, expiry = heapq.heappop(heap)
            callback = expiry.callback
            if callback is None or expiry.due != due:
                self.stale -= 1
                continue
            expiry.callback = None
            try:
                callback()
            except Exception:  # one owner's bug must not stop everyone else's expiry
                log.exception("token expiry callback failed")
        if heap:
            self._arm(heap[0][0])

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
