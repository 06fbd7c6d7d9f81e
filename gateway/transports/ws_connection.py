"""One accepted `/ws` socket: its subscriptions, its replies and its lifecycle, as callbacks.

A connection has no task of its own while it idles. Its channel (`ws_socket.WSChannel`: the
detached socket, or ASGI through `ws_fallback`) calls `received` with each client message
and `writable`/`lost` as the socket drains or goes. Commands that answer at once (ping,
unsubscribe) are answered in `received`; those that wait on admission (subscribe, refresh)
run one at a time in a short-lived task, and what the client sends meanwhile waits behind
them, so replies keep the order of the commands.

Events follow SSE's path (`transports.sse`): while the connection has nothing else to say it
is its subscriptions' `direct` output and the topic's pass writes the frames joined once for
every socket; otherwise a subscription's `wake` queues the connection for the same pass and
`flush` writes its replies, then each subscription's continuity notice, new events and
ending. Every subscription is released on every exit path, at the latest in `lost`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gateway.auth.admission import Admitted, ConnectionHold, StreamHold
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
from gateway.logs import request_id
from gateway.transports.ending import Ending, continuity_notice, ending
from gateway.transports.ws_socket import WSChannel

if TYPE_CHECKING:
    from gateway.transports.websocket import WebSocketStreams

log = logging.getLogger("gateway.ws")

MESSAGE_TOO_BIG = 1009
"""RFC 6455 close code for a client message over `websocket.max_message_bytes` (do not reconnect as is)."""
INTERNAL_ERROR = 1011
MAX_PENDING_REPLIES = 256
"""Replies held for a client whose socket is full; past this it is closed as a slow consumer."""
MAX_PENDING_COMMANDS = 32
"""Commands waiting behind a subscribe or refresh in flight; past this they are refused as rate-limited."""
STRIKE_WINDOW = 10.0
"""More than `message_burst` refused (rate-limited or invalid) messages within about this many seconds
closes the socket with `policy_violation`."""
SOCKET_REASONS = frozenset({SHUTTING_DOWN, SLOW_CONSUMER, TOKEN_EXPIRED, POLICY_VIOLATION})
"""Reasons that end the whole socket (its close code); any other reason ends one subscription."""

Command = proto.Subscribe | proto.Unsubscribe | proto.Ping | proto.Refresh


class Watch:
    """One subscription on one socket, and what admission holds for it."""

    __slots__ = ("hold", "kind", "stream", "sub")

    def __init__(self, stream: str, hold: StreamHold) -> None:
        self.stream = stream
        self.hold = hold
        self.sub: Subscription = hold.sub
        self.kind = hold.sub.topic.kind


class WSConnection:
    """One accepted `/ws` socket (the channel's `WSSink`, and its subscriptions' `DirectOutput`)."""

    # Slots: thousands of these live for hours, and every publish touches each one's flags.
    __slots__ = ("admitted", "bytes_sent", "channel", "clock", "close_code", "close_text", "commands", "done",
                 "events_sent", "expiry", "hold", "owner", "queued", "rate", "replies", "rid", "stalled_since",
                 "started", "strikes", "subs", "worker")

    def __init__(self, owner: WebSocketStreams, admitted: Admitted, hold: ConnectionHold) -> None:
        self.owner = owner
        #: Set by the endpoint once the socket is accepted (the detached socket, or ASGI's).
        self.channel: WSChannel = _NO_CHANNEL
        self.admitted = admitted
        self.hold = hold
        self.clock = owner.clock
        config = owner.config
        self.subs: dict[str, Watch] = {}
        #: Replies held while the socket is full (None: none), written before anything else.
        self.replies: list[str] | None = None
        #: Commands waiting for the one in flight (None: nothing in flight).
        self.commands: list[Command] | None = None
        self.worker: asyncio.Task[None] | None = None
        self.close_code: int | None = None
        self.close_text = ""
        self.queued = False
        #: Set once everything was released (the socket is gone): nothing may be added after.
        self.done = False
        self.stalled_since = 0.0
        self.rate = TokenBucket(config.messages_per_second, config.message_burst, owner.clock)
        self.strikes = TokenBucket(config.message_burst / STRIKE_WINDOW, config.message_burst, owner.clock)
        self.expiry = owner.expiries.schedule(admitted.principal.valid_until, self._expired)
        self.events_sent = 0
        self.bytes_sent = 0  # event payload bytes (frames included on a detached socket)
        self.rid = request_id.get()
        self.started = owner.clock()

    # -- socket-wide ---------------------------------------------------------------------------

    def close(self, reason: CloseReason) -> None:
        """Close the whole socket with `reason`'s WebSocket code."""
        self._shut(reason.ws_code, reason.code, reason)

    def _expired(self) -> None:
        self.close(TOKEN_EXPIRED)

    def _shut(self, code: int, text: str, reason: CloseReason | None = None) -> None:
        """Release every subscription, send what is owed (unless the client is not reading), then close."""
        if self.close_code is not None or self.done:
            return
        self.close_code, self.close_text = code, text
        metrics = self.owner.metrics
        if reason is not None:
            metrics.closes.labels(reason.code).inc()
            if reason is SLOW_CONSUMER:
                metrics.slow_consumers.inc()
        self.expiry.cancel()
        for stream in list(self.subs):
            self._remove(stream)
        replies, self.replies = self.replies, None
        channel = self.channel
        if replies and reason is not SLOW_CONSUMER:
            for text_ in replies:
                channel.send_text(text_)
        channel.close(code, text)

    def _abort(self) -> None:
        """The hub saw a send stuck past `send_timeout`: close as a slow consumer, and drop the socket
        if the close cannot be written either."""
        self.close(SLOW_CONSUMER)

    def _reply(self, text: str) -> None:
        """Answer the client now, or after what is already held when the socket is full."""
        if self.close_code is not None:
            return
        replies = self.replies
        channel = self.channel
        if replies is None and not channel.paused:
            channel.send_text(text)
            return
        if replies is None:
            replies = self.replies = []
            self._stalled(self.clock())
        if len(replies) >= MAX_PENDING_REPLIES:
            self.close(SLOW_CONSUMER)
            return
        replies.append(text)

    # -- the channel's callbacks (`WSSink`) --------------------------------------------------------

    def received(self, data: str | bytes) -> None:
        """One message from the client: refused, answered now, or queued behind a command in flight."""
        if self.close_code is not None or self.done:
            return
        owner = self.owner
        outcomes = owner.metrics.ws_messages
        size = len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
        if size > owner.config.max_message_bytes:
            outcomes.labels("too_large").inc()
            self._shut(MESSAGE_TOO_BIG, "message too big")
            return
        if not self.rate.allow():
            outcomes.labels("rate_limited").inc()
            self._strike(proto.error("rate_limited", "too many messages; slow down"))
            return
        try:
            command = proto.parse_message(data)
        except proto.ProtocolError as exc:
            outcomes.labels("invalid").inc()
            self._strike(proto.error(exc.code, exc.message, exc.stream))
            return
        commands = self.commands
        if commands is not None:
            if len(commands) >= MAX_PENDING_COMMANDS:
                outcomes.labels("rate_limited").inc()
                self._strike(proto.error("rate_limited", "too many commands in flight; slow down"))
                return
            outcomes.labels("accepted").inc()
            commands.append(command)
            return
        outcomes.labels("accepted").inc()
        if not self._answer(command):
            self.commands = [command]
            self.worker = asyncio.get_running_loop().create_task(self._work())

    def broken(self, code: int, reason: str) -> None:
        """The client broke the protocol; the channel closes with `code`."""
        if code == MESSAGE_TOO_BIG:
            self.owner.metrics.ws_messages.labels("too_large").inc()
        self._shut(code, reason)

    def writable(self) -> None:
        self._unstalled()
        self.flush()

    def lost(self) -> None:
        """The socket is gone: release everything, once."""
        if self.done:
            return
        self.done = True
        self.expiry.cancel()
        for stream in list(self.subs):
            self._remove(stream)
        self.replies = self.commands = None
        worker = self.worker
        if worker is not None and worker is not asyncio.current_task():
            worker.cancel()
        self.hold.release()
        self.owner.connections.discard(self)
        token = request_id.set(self.rid)
        try:
            log.debug("websocket closed", extra={
                "transport": "ws", "duration": round(self.clock() - self.started, 3), "events": self.events_sent,
                "bytes": self.bytes_sent,
                "close_code": self.close_code if self.close_code is not None else "client_closed"})
        finally:
            request_id.reset(token)

    # -- commands ----------------------------------------------------------------------------

    def _answer(self, command: Command) -> bool:
        """Answer a command that needs no waiting; False for one that does (subscribe, refresh)."""
        if isinstance(command, proto.Ping):
            self._reply(proto.pong())
        elif isinstance(command, proto.Unsubscribe):
            self._remove(command.stream)
            self._reply(proto.unsubscribed(command.stream))
        else:
            return False
        return True

    async def _work(self) -> None:
        """Run queued commands in order until none is left (a subscribe or refresh at the head)."""
        try:
            commands = self.commands
            while commands and self.close_code is None and not self.done:
                command = commands.pop(0)
                if self._answer(command):
                    continue
                if isinstance(command, proto.Refresh):
                    await self._refresh(command)
                else:
                    assert isinstance(command, proto.Subscribe)
                    await self._subscribe(command)
        except Exception:
            log.exception("websocket command failed", extra={"transport": "ws"})
            self._shut(INTERNAL_ERROR, "internal error")
        finally:
            self.commands = None
            self.worker = None

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
        except GatewayError as exc:
            self._reply(proto.error(exc.code, exc.message, stream))
            return
        try:
            if self.close_code is not None or self.done or owner.draining:
                hold.release()
                if owner.draining:
                    self.close(SHUTTING_DOWN)
                return
            await hold.claim()
        except GatewayError as exc:
            self._reply(proto.error(exc.code, exc.message, stream))
            return
        except BaseException:
            hold.release()
            raise
        if self.close_code is not None or self.done or stream in self.subs:
            hold.release()  # the socket ended (or subscribed) while the claim was taken
            return
        watch = Watch(stream, hold)
        self.subs[stream] = watch
        sub = watch.sub
        sub.wake = self._on_wake
        sub.abort = self._abort
        sub.transport = "ws"
        if self.channel.frames:
            # The topic's pass may write this subscription's frames itself (`Topic.flush`).
            sub.direct, sub.ws, sub.tally = self, True, owner.deliveries
        owner.subscribers[watch.kind].inc()
        self._reply(proto.subscribed(stream))
        self._on_wake()  # history to replay, a continuity notice, or superseded while the claim was taken

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
        if self.close_code is not None or self.done:
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

    # -- subscriptions ---------------------------------------------------------------------------

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
        self.owner.subscribers[watch.kind].dec()
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

    # -- writing (the hub's callbacks) ---------------------------------------------------------

    @property
    def paused(self) -> bool:
        """The topic's pass may write for this connection only when nothing else waits to be said."""
        return self.replies is not None or self.close_code is not None or self.channel.paused

    def write(self, data: bytes) -> None:
        self.channel.write_frames(data)

    def _on_wake(self) -> None:
        """A subscription has news: queue the connection for the hub's next pass."""
        if not self.queued and not self.done:
            self.queued = True
            self.owner.flushes.add(self)

    def _stalled(self, now: float) -> None:
        """The socket is full: the hub's sweep (or the keepalive pass) cuts it off if it stays so."""
        if not self.stalled_since:
            self.stalled_since = now
        for watch in self.subs.values():
            if not watch.sub.sending_since:
                watch.sub.sending_since = now

    def _unstalled(self) -> None:
        self.stalled_since = 0.0
        for watch in self.subs.values():
            watch.sub.sending_since = 0.0

    def flush(self) -> None:
        """Write what is due: held replies, then per subscription its notice, new events and ending.

        A full socket stops the pass; the frames wait in the shared log until `writable`.
        """
        self.queued = False
        if self.done or self.close_code is not None:
            return
        channel = self.channel
        now = self.clock()
        if channel.paused:
            self._stalled(now)
            return
        replies = self.replies
        if replies is not None:
            self.replies = None
            for text in replies:
                channel.send_text(text)
            if channel.paused:
                self._stalled(now)
                return
        inactivity = self.owner.limits.inactivity_timeout
        for stream, watch in list(self.subs.items()):
            if self.close_code is not None:
                return
            if self.subs.get(stream) is not watch:
                continue
            sub = watch.sub
            if not sub.closed:
                notice = continuity_notice(sub)
                if notice is not None:
                    self._reply(proto.error("continuity_lost", "the requested position is no longer available; "
                                            "the retained history follows", stream,
                                            reason=notice[0], oldestRetainedId=id_value(notice[1])))
                if self._write_events(sub, now):
                    self._stalled(now)
                    return
            end = ending(sub, now, inactivity)
            if end is not None:
                if end.reason is not None and end.reason in SOCKET_REASONS:
                    self.close(end.reason)
                    return
                self._end(watch, end)
                if self.replies is not None:
                    return  # the socket filled up; `writable` resumes the pass

    def _write_events(self, sub: Subscription, now: float) -> bool:
        """Write every new event of `sub` while the socket has room; True if it filled up."""
        channel = self.channel
        deliveries = self.owner.deliveries
        topic = sub.topic
        while not sub.closed:
            if channel.frames:
                taken = sub.take(ws=True)
                if taken is None:
                    return False
                frames, batch = taken
                channel.write_frames(frames)
                sub.sent_bytes += len(frames)
                deliveries.delivered(1, batch)
            else:
                events = sub.take_events()
                if events is None:
                    return False
                for event in events:
                    text = event.ws
                    channel.send_text(text)
                    sub.sent_bytes += len(text)
                batch = events
                deliveries.count(len(events), 1, events[-1].received_at)
            sub.sent_events += len(batch)
            sub.last_delivery = sub.last_write = now
            if channel.paused:
                return True
            if sub.cursor >= topic.head:
                return False
        return False


def _noop() -> None:
    return None


class _NoChannel:
    """The channel of a connection not yet started: full, so nothing is written to it."""

    frames = False
    paused = True

    def send_text(self, text: str) -> None:
        return None

    def write_frames(self, data: bytes) -> None:
        return None

    def close(self, code: int, reason: str) -> None:
        return None

    def abort(self) -> None:
        return None

    def keepalive(self, now: float, interval: float, timeout: float) -> None:
        return None


_NO_CHANNEL = _NoChannel()
