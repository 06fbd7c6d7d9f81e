"""One accepted `/ws` socket: its lifecycle, its subscriptions and its reader.

Each subscription is a hub `Subscription` held through admission (`StreamHold`). The reader
parses client messages (sans-I/O, `codec.ws_messages`) and answers through the reply queue;
the socket's single writer (`ws_writer.FrameWriter`, mixed in here) sends replies, then each
subscription's new events. Whichever task ends first (client gone, or the writer closing the
socket) cancels the other, and every subscription is released on every exit path.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from gateway.auth.admission import Admitted, StreamHold
from gateway.codec import ws_messages as proto
from gateway.codec.closes import (
    FORBIDDEN,
    POLICY_VIOLATION,
    SHUTTING_DOWN,
    SLOW_CONSUMER,
    TOKEN_EXPIRED,
    CloseReason,
)
from gateway.codec.streams import id_value
from gateway.errors import AuthError, GatewayError
from gateway.hub.subscription import Subscription
from gateway.limits.ratelimit import TokenBucket
from gateway.transports.direct import FrameOutput
from gateway.transports.ending import Ending
from gateway.transports.ws_writer import FrameWriter
from gateway.types import Receive, Send

if TYPE_CHECKING:
    from gateway.transports.websocket import WebSocketStreams

log = logging.getLogger("gateway.ws")

MESSAGE_TOO_BIG = 1009
"""RFC 6455 close code for a client message over `websocket.max_message_bytes` (do not reconnect as is)."""
MAX_PENDING_REPLIES = 256
"""Replies queued for a client that does not read them; past this it is closed as a slow consumer."""
STRIKE_WINDOW = 10.0
"""More than `message_burst` refused (rate-limited or invalid) messages within about this many seconds
closes the socket with `policy_violation`."""


class Watch:
    """One subscription on one socket, and what admission holds for it."""

    __slots__ = ("hold", "kind", "stream", "sub")

    def __init__(self, stream: str, hold: StreamHold) -> None:
        self.stream = stream
        self.hold = hold
        self.sub: Subscription = hold.sub
        self.kind = hold.sub.topic.kind


class WSConnection(FrameWriter):
    """One accepted `/ws` socket: its subscriptions, its reply queue, its reader and its writer."""

    # Slots: thousands of these live for hours, and every publish touches each one's flags.
    __slots__ = ("_finished", "_writer", "admitted", "clock", "close_code", "close_text", "consumer", "expiry",
                 "frames", "owner", "rate", "receive", "replies", "send", "strikes", "subs", "wake")

    def __init__(self, owner: WebSocketStreams, receive: Receive, send: Send, admitted: Admitted,
                 frames: FrameOutput | None = None) -> None:
        self.owner = owner
        self.receive = receive
        self.send = send
        #: The socket itself (`gateway.direct`): each wake-up writes a subscription's events as one write.
        self.frames = frames
        if frames is not None:
            frames.on_writable(self._writable)
        self.admitted = admitted
        self.consumer = admitted.consumer
        self.clock = owner.clock
        config = owner.config
        self.subs: dict[str, Watch] = {}
        self.replies: deque[str] = deque()
        self.wake = asyncio.Event()
        self.close_code: int | None = None
        self.close_text = ""
        self.rate = TokenBucket(config.messages_per_second, config.message_burst, owner.clock)
        self.strikes = TokenBucket(config.message_burst / STRIKE_WINDOW, config.message_burst, owner.clock)
        self._writer: asyncio.Task[None] | None = None
        #: The writer waits for news; `flush` may then write events without waking it.
        self._parked = False
        self._queued = False
        self._aborted = False
        #: Set once the socket's subscriptions were released: nothing may be added after.
        self._finished = False
        self.expiry = owner.expiries.schedule(admitted.principal.valid_until, self._expired)
        self.events_sent = 0
        self.bytes_sent = 0  # event payload characters (ASCII JSON: bytes)

    # -- lifecycle --------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run reader and writer until one ends; release every subscription whatever happens."""
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read())
        writer = self._writer = loop.create_task(self._write())
        started = self.clock()
        log.debug("websocket opened", extra={"transport": "ws"})
        try:
            done, pending = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                exc = None if task.cancelled() else task.exception()
                if exc is not None and not isinstance(exc, OSError):
                    log.error("websocket task failed", exc_info=exc, extra={"transport": "ws"})
        finally:
            self._finished = True
            self.expiry.cancel()
            for task in (reader, writer):
                task.cancel()
            for stream in list(self.subs):
                self._remove(stream)
            log.debug("websocket closed", extra={
                "transport": "ws", "duration": round(self.clock() - started, 3), "events": self.events_sent,
                "bytes": self.bytes_sent,
                "close_code": self.close_code if self.close_code is not None else "client_closed"})

    def close(self, reason: CloseReason) -> None:
        """Close the whole socket with `reason`'s WebSocket code (the writer sends it)."""
        self._shut(reason.ws_code, reason.code, reason)

    def _expired(self) -> None:
        self.close(TOKEN_EXPIRED)

    def _shut(self, code: int, text: str, reason: CloseReason | None = None) -> None:
        if self.close_code is None:
            self.close_code, self.close_text = code, text
            if reason is not None:
                self.owner.metrics.closes.labels(reason.code).inc()
                if reason is SLOW_CONSUMER:
                    self.owner.metrics.slow_consumers.inc()
        self.wake.set()

    def _abort(self) -> None:
        """The hub saw a send stuck past `send_timeout`: stop writing events and close as a slow consumer."""
        self.close(SLOW_CONSUMER)
        writer = self._writer
        if writer is not None and not writer.done() and not self._aborted:
            self._aborted = True
            writer.cancel()

    def _reply(self, text: str) -> None:
        if len(self.replies) >= MAX_PENDING_REPLIES:
            self._abort()
            return
        self.replies.append(text)
        self.wake.set()

    # -- subscriptions ----------------------------------------------------------------------------

    async def _subscribe(self, command: proto.Subscribe) -> None:
        stream = command.stream
        owner = self.owner
        if stream in self.subs:
            self._reply(proto.error("already_subscribed", "this socket already watches the stream", stream))
            return
        if len(self.subs) >= owner.config.max_subscriptions:
            self._reply(proto.error("too_many_subscriptions",
                                    f"at most {owner.config.max_subscriptions} subscriptions per socket", stream))
            return
        try:
            hold = await owner.admission.join(self.admitted, stream, command.after_event_id)
            if self.close_code is not None or stream in self.subs or owner.draining:
                hold.release()
                if owner.draining:
                    self.close(SHUTTING_DOWN)
                return
            await hold.claim()
        except GatewayError as exc:
            self._reply(proto.error(exc.code, exc.message, stream))
            return
        if self._finished or stream in self.subs:  # the socket ended (or subscribed) while the claim was taken
            hold.release()
            return
        watch = Watch(stream, hold)
        self.subs[stream] = watch
        sub = watch.sub
        sub.wake = self._on_wake
        sub.abort = self._abort
        sub.transport = "ws"
        if self.frames is not None:
            # The topic's pass may write this subscription's frames itself while the writer is parked.
            sub.direct, sub.ws, sub.tally = self, True, owner.deliveries
        owner.metrics.subscribers.labels("ws", watch.kind).inc()
        self._reply(proto.subscribed(stream))
        self.wake.set()  # in case it was superseded while the claim was being taken

    def _remove(self, stream: str) -> Watch | None:
        watch = self.subs.pop(stream, None)
        if watch is None:
            return None
        sub = watch.sub
        sub.wake = _noop
        sub.abort = _noop
        sub.direct = sub.tally = None
        self.events_sent += sub.sent_events
        self.bytes_sent += sub.sent_bytes
        watch.hold.release()
        self.owner.metrics.subscribers.labels("ws", watch.kind).dec()
        return watch

    def _end(self, watch: Watch, end: Ending) -> None:
        """End one subscription: an `error` frame with the reason (if the gateway ended it), then `unsubscribed`."""
        if self._remove(watch.stream) is None:
            return
        reason = end.reason
        if reason is not None:
            self.owner.metrics.closes.labels(reason.code).inc()
            self._reply(proto.error(reason.code, reason.message, watch.stream, reconnect=reason.reconnect,
                                    lastEventId=id_value(end.last_event_id), detail=end.detail, poll=end.poll))
        self._reply(proto.unsubscribed(watch.stream))

    def _announce_continuity_lost(self, watch: Watch, reason: str, oldest: str | None) -> None:
        """Sent after `subscribed` and before the retained history, like SSE's `gateway.continuity_lost`."""
        self._reply(proto.error("continuity_lost", "the requested position is no longer available; "
                                "the retained history follows", watch.stream,
                                reason=reason, oldestRetainedId=id_value(oldest)))

    # -- reader -----------------------------------------------------------------------------------

    async def _read(self) -> None:
        limit = self.owner.config.max_message_bytes
        outcomes = self.owner.metrics.ws_messages
        while True:
            message = await self.receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                return
            if kind != "websocket.receive" or self.close_code is not None:
                continue
            text = message.get("text")
            data: str | bytes = text if text is not None else (message.get("bytes") or b"")
            size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
            if size > limit:
                outcomes.labels("too_large").inc()
                self._shut(MESSAGE_TOO_BIG, "message too big")
                continue
            if not self.rate.allow():
                outcomes.labels("rate_limited").inc()
                self._strike(proto.error("rate_limited", "too many messages; slow down"))
                continue
            try:
                command = proto.parse_message(data)
            except proto.ProtocolError as exc:
                outcomes.labels("invalid").inc()
                self._strike(proto.error(exc.code, exc.message, exc.stream))
                continue
            outcomes.labels("accepted").inc()
            if isinstance(command, proto.Ping):
                self._reply(proto.pong())
            elif isinstance(command, proto.Refresh):
                await self._refresh(command)
            elif isinstance(command, proto.Unsubscribe):
                self._remove(command.stream)
                self._reply(proto.unsubscribed(command.stream))
            else:
                await self._subscribe(command)

    async def _refresh(self, command: proto.Refresh) -> None:
        """A fresh token on the open socket: its expiry moves; streams it no longer grants end as `forbidden`.

        A token that is invalid or for another user changes nothing (`refresh_refused`). A webhook
        that cannot be asked keeps the streams it granted (only an answer ends one).
        """
        admission = self.owner.admission
        try:
            principal = await admission.refresh(self.admitted, command.token)
        except AuthError as exc:
            self._reply(proto.error("refresh_refused", exc.message))
            return
        self.expiry.move(principal.valid_until)
        self._reply(proto.refreshed(principal.expires_at))
        for stream, watch in list(self.subs.items()):
            try:
                await admission.authorize(self.admitted, stream)
            except AuthError as exc:
                if exc.reason != "webhook_failed" and self.subs.get(stream) is watch:
                    watch.sub.close(FORBIDDEN)

    def _strike(self, reply: str) -> None:
        """Answer a refused message; past the tolerance the socket is closed for abuse."""
        if self.strikes.allow():
            self._reply(reply)
        else:
            self.close(POLICY_VIOLATION)


def _noop() -> None:
    return None
