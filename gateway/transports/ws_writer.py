"""The writer of one `/ws` socket: replies first, then each subscription's new events; one writer per socket.

While the writer is parked with nothing to say, the topic's pass writes new events to the
socket itself as ready-made frames joined once for every socket (the connection is its
subscriptions' `direct` output, `hub.ports.DirectOutput`); otherwise `wake` sets the
connection's event and the writer task flushes pending replies, then every subscription's
new events, then what ends (`transports.ending`). `FrameWriter` is mixed into
`WSConnection`, which owns the state it works on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.codec.closes import POLICY_VIOLATION, SHUTTING_DOWN, SLOW_CONSUMER, TOKEN_EXPIRED, CloseReason
from gateway.codec.events import Event
from gateway.hub.subscription import Subscription
from gateway.transports.direct import FrameOutput
from gateway.transports.ending import Ending, continuity_notice, ending
from gateway.types import Send

if TYPE_CHECKING:
    from gateway.transports.websocket import WebSocketStreams
    from gateway.transports.ws_connection import Watch

SOCKET_REASONS = frozenset({SHUTTING_DOWN, SLOW_CONSUMER, TOKEN_EXPIRED, POLICY_VIOLATION})
"""Reasons that end the whole socket (its close code); any other reason ends one subscription."""
CLOSE_TIMEOUT = 5.0
"""Seconds a close frame may wait behind unsent data (a stuck client) before the socket is just dropped."""


class FrameWriter:
    """The writing half of `WSConnection`, which owns the rest of the state annotated here."""

    __slots__ = ("_aborted", "_parked", "_queued", "bytes_sent", "events_sent")

    _aborted: bool
    _parked: bool
    _queued: bool
    bytes_sent: int
    events_sent: int

    owner: WebSocketStreams
    send: Send
    frames: FrameOutput | None
    subs: dict[str, Watch]
    replies: deque[str]
    wake: asyncio.Event
    close_code: int | None
    close_text: str
    clock: Callable[[], float]

    def close(self, reason: CloseReason) -> None:
        raise NotImplementedError

    def _end(self, watch: Watch, end: Ending) -> None:
        raise NotImplementedError

    def _announce_continuity_lost(self, watch: Watch, reason: str, oldest: str | None) -> None:
        raise NotImplementedError

    async def _write_frames(self, sub: Subscription, frames: bytes, batch: list[Event]) -> None:
        """Every pending event of one subscription as one write of their shared, ready-made frames."""
        output = self.frames
        assert output is not None
        if not self._deliver(sub, frames, batch, self.clock()):
            raise ConnectionResetError("the socket is closing")
        if output.paused:
            await self._drain()

    def _deliver(self, sub: Subscription, frames: bytes, batch: list[Event], now: float) -> bool:
        output = self.frames
        assert output is not None
        owner = self.owner
        if not output.write_frames(frames):
            return False
        sub.sent_events += len(batch)
        sub.sent_bytes += len(frames)
        sub.last_delivery = sub.last_write = now
        owner.deliveries.delivered(1, batch)
        return True

    # -- the topic pass's direct writes (`hub.DirectOutput`) ------------------------------------

    @property
    def paused(self) -> bool:
        """Only a parked writer with nothing else to say lets the topic's pass write for it."""
        frames = self.frames
        return (frames is None or not self._parked or bool(self.replies) or self.close_code is not None
                or frames.paused)

    def write(self, data: bytes) -> None:
        if self.frames is not None:
            self.frames.write_frames(data)

    async def _drain(self) -> None:
        """Wait for a full socket to drain; the hub's sweep cuts it off if it stays full for `send_timeout`."""
        assert self.frames is not None
        self._stalled(self.clock())
        try:
            await self.frames.drained()
        finally:
            self._unstalled()

    def _on_wake(self) -> None:
        """A subscription has news: deliver it from the shared flush if the writer is parked, else wake it."""
        if self._parked and self.frames is not None and not self.replies and self.close_code is None:
            if not self._queued:
                self._queued = True
                self.owner.flushes.add(self)
            return
        self.wake.set()

    def _writable(self) -> None:
        """The socket drained: pending events go out."""
        self._unstalled()
        self._on_wake()

    def _stalled(self, now: float) -> None:
        """The socket is full: the hub's sweep cuts it off if it stays so for `send_timeout`."""
        for watch in self.subs.values():
            if not watch.sub.sending_since:
                watch.sub.sending_since = now

    def _unstalled(self) -> None:
        for watch in self.subs.values():
            watch.sub.sending_since = 0.0

    def flush(self) -> None:
        """Write each subscription's new frames while the writer stays parked; anything else wakes it.

        A full socket does not wake the writer either: the frames wait in the shared log
        until the socket's `resume_writing` calls `_writable`.
        """
        self._queued = False
        frames = self.frames
        if not self._parked or frames is None or self.replies or self.close_code is not None:
            self.wake.set()
            return
        now = self.clock()
        if frames.paused:
            self._stalled(now)
            return
        inactivity = self.owner.limits.inactivity_timeout
        for watch in self.subs.values():
            sub = watch.sub
            if sub.closed or sub.continuity_lost:
                break
            taken = sub.take(ws=True)
            if taken is None:
                if ending(sub, now, inactivity) is not None:
                    break  # the writer task says goodbye
                continue
            if not self._deliver(sub, taken[0], taken[1], now):
                break
            if frames.paused:
                self._stalled(now)
                return
        else:
            return
        self.wake.set()  # the writer task handles what a flush does not: ends, closes, a full socket

    async def _write(self) -> None:
        try:
            await self._pump()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._aborted or task is None:
                raise
            task.uncancel()
        code = self.close_code if self.close_code is not None else 1000
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                # Replies already owed (the pongs and errors before a policy close) go out first,
                # unless the client is not reading at all.
                while self.replies and not self._aborted and code != SLOW_CONSUMER.ws_code:
                    await self.send({"type": "websocket.send", "text": self.replies.popleft()})
                await self.send({"type": "websocket.close", "code": code, "reason": self.close_text})

    async def _pump(self) -> None:
        """The only code that writes to the socket: replies first, then each subscription's new events."""
        owner = self.owner
        send = self.send
        clock = self.clock
        inactivity = owner.limits.inactivity_timeout
        while self.close_code is None:
            self.wake.clear()
            if self.replies:
                # Replies have no hub subscription for `Hub.sweep` to watch, so they carry their own deadline.
                try:
                    async with asyncio.timeout(owner.limits.send_timeout):
                        while self.replies and self.close_code is None:
                            await send({"type": "websocket.send", "text": self.replies.popleft()})
                except TimeoutError:
                    self._aborted = True
                    self.close(SLOW_CONSUMER)
                    return
            busy = False
            for stream, watch in list(self.subs.items()):
                if self.close_code is not None:
                    return
                if self.subs.get(stream) is not watch:
                    continue
                sub = watch.sub
                if sub.closed:
                    reason = sub.close_reason
                    if reason is not None and reason in SOCKET_REASONS:
                        self.close(reason)
                        return
                    end = ending(sub, clock(), inactivity)
                    assert end is not None
                    self._end(watch, end)
                    busy = True
                    continue
                notice = continuity_notice(sub)
                if notice is not None:
                    self._announce_continuity_lost(watch, *notice)
                    busy = True
                    continue
                if self.frames is not None:
                    taken = sub.take(ws=True)
                    if taken is not None:
                        await self._write_frames(sub, *taken)
                        busy = True
                        continue
                    batch = None
                else:
                    batch = sub.take_events()
                if batch is not None:
                    sent = 0
                    for event in batch:
                        if self.subs.get(stream) is not watch or self.close_code is not None:
                            break
                        sub.sending_since = clock()
                        text = event.ws
                        await send({"type": "websocket.send", "text": text})
                        sent += 1
                        self.bytes_sent += len(text)
                    sub.sending_since = 0.0
                    self.events_sent += sent
                    owner.deliveries.count(sent, 1, batch[-1].received_at)
                    sub.last_delivery = sub.last_write = clock()
                    busy = True
                    continue
                end = ending(sub, clock(), inactivity)
                if end is not None:
                    if end.reason is not None and end.reason in SOCKET_REASONS:
                        self.close(end.reason)
                        return
                    self._end(watch, end)
                    busy = True
            if self.frames is not None and self.frames.paused and self.close_code is None:
                await self._drain()
            elif not busy and not self.replies and self.close_code is None:
                self._parked = True
                try:
                    await self.wake.wait()
                finally:
                    self._parked = False
