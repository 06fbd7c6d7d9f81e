"""Browser WebSocket (`/ws`): many stream subscriptions over one socket, as a raw ASGI endpoint.

Admission happens before the upgrade: a bad token, a foreign Origin or a full gateway is
answered with a plain HTTP 401/403/429/503 (the `websocket.http.response` extension), so
nothing is accepted and nothing is opened upstream. Each accepted socket is one
`WSConnection`: a reader that parses client messages (sans-I/O, `gateway.ws_protocol`)
and the socket's single writer. Each subscription is a hub `Subscription`. While the
writer is parked with nothing to say, the topic's pass writes new events to the socket
itself as ready-made frames joined once for every socket (the connection is the
subscription's `direct` output); otherwise `wake` sets the connection's event and the
writer flushes pending replies, then every subscription's new events.
Whichever task ends first (client gone, or the writer closing the socket) cancels the
other, and every subscription is released on every exit path.

Per-subscription endings (superseded, inactivity, upstream failure) are an `error` frame
followed by `unsubscribed`; the socket stays open. Socket-wide endings (drain, slow
consumer, token expiry, abuse) are the close codes of `gateway.closes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from gateway.auth.address import header_map
from gateway.auth.admission import Admission, Admitted
from gateway.codec import ws_messages as proto
from gateway.codec.closes import (
    INACTIVITY_TIMEOUT,
    POLICY_VIOLATION,
    SHUTTING_DOWN,
    SLOW_CONSUMER,
    TOKEN_EXPIRED,
    CloseReason,
)
from gateway.codec.events import Event
from gateway.codec.streams import JOB_KIND, id_value
from gateway.config import LimitsConfig, WebSocketConfig
from gateway.errors import GatewayError, LimitError
from gateway.hub.ports import StreamUnavailable
from gateway.hub.registry import Hub
from gateway.hub.subscription import Subscription
from gateway.limits.connections import ConnectionLimiter
from gateway.limits.exclusive import ExclusiveStreams
from gateway.limits.quota import StreamQuota
from gateway.limits.ratelimit import TokenBucket
from gateway.logs import new_request_id, request_id
from gateway.metrics import Deliveries, Metrics
from gateway.transports.direct import FrameOutput, frame_output
from gateway.types import Receive, Scope, Send

log = logging.getLogger("gateway.ws")

SOCKET_REASONS = frozenset({SHUTTING_DOWN, SLOW_CONSUMER, TOKEN_EXPIRED, POLICY_VIOLATION})
"""Reasons that end the whole socket (its close code); any other reason ends one subscription."""
MESSAGE_TOO_BIG = 1009
"""RFC 6455 close code for a client message over `websocket.max_message_bytes` (do not reconnect as is)."""
DENIAL_CODES = {401: 4401, 403: 4403}
"""Close codes after accept, for servers without the `websocket.http.response` extension."""
TRY_AGAIN_LATER = 1013
CLOSE_TIMEOUT = 5.0
"""Seconds a close frame may wait behind unsent data (a stuck client) before the socket is just dropped."""
MAX_PENDING_REPLIES = 256
"""Replies queued for a client that does not read them; past this it is closed as a slow consumer."""
STRIKE_WINDOW = 10.0
"""More than `message_burst` refused (rate-limited or invalid) messages within about this many seconds
closes the socket with `policy_violation`."""

def _noop() -> None:
    return None


class WebSocketStreams:
    """The `/ws` endpoint and the registry of its live connections."""

    def __init__(self, hub: Hub, admission: Admission, limiter: ConnectionLimiter, exclusive: ExclusiveStreams,
                 limits: LimitsConfig, config: WebSocketConfig, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 quota: StreamQuota | None = None) -> None:
        self.hub = hub
        self.admission = admission
        self.limiter = limiter
        self.exclusive = exclusive
        self.quota = quota or StreamQuota(limits.max_streams_per_consumer)
        self.limits = limits
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.wall_clock = wall_clock
        self.connections: set[WSConnection] = set()
        self.draining = False
        self.deliveries = Deliveries(metrics.frames_sent.labels("ws"), metrics.fanout_delay, clock)
        self.flushes = hub.flushes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = request_id.set(new_request_id())
        try:
            await self._handle(scope, receive, send)
        finally:
            request_id.reset(token)

    def close_all(self, reason: CloseReason = SHUTTING_DOWN) -> int:
        """Start of a drain: close every socket (with or without subscriptions) with `reason`."""
        self.draining = True
        for connection in list(self.connections):
            connection.close(reason)
        return len(self.connections)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        headers = header_map(scope)
        try:
            if self.draining:
                raise LimitError("the gateway is restarting", status=503, code="shutting_down", retry_after=1,
                                 reason="draining")
            admitted = await self.admission.admit(scope, headers, None, websocket=True)
            self.limiter.check(admitted.principal.consumer, admitted.client_ip)
        except GatewayError as exc:
            if isinstance(exc, LimitError):
                self.metrics.limit_rejections.labels(exc.reason).inc()
            await _deny(scope, send, exc)
            return
        del headers, message  # this frame lives as long as the socket: keep only what it needs
        offered = scope.get("subprotocols") or []
        subprotocol = proto.SUBPROTOCOL if proto.SUBPROTOCOL in offered else None
        with self.limiter.hold(admitted.principal.consumer, admitted.client_ip):
            try:
                await send({"type": "websocket.accept", "subprotocol": subprotocol})
            except OSError:
                return  # the client left during the handshake
            connection = WSConnection(self, receive, send, admitted, frame_output(scope))
            self.connections.add(connection)
            try:
                await connection.serve()
            finally:
                self.connections.discard(connection)


async def _deny(scope: Scope, send: Send, exc: GatewayError) -> None:
    """Refuse the upgrade with a real HTTP answer when the server can send one, else close right after accept."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = exc.body()
        headers = [*exc.headers(), (b"content-length", str(len(body)).encode())]
        await send({"type": "websocket.http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
        return
    code = DENIAL_CODES.get(exc.status, TRY_AGAIN_LATER if exc.status in (429, 503) else 1008)
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": code, "reason": exc.code})


class _Watch:
    """One subscription on one socket."""

    __slots__ = ("kind", "stream", "sub")

    def __init__(self, stream: str, sub: Subscription) -> None:
        self.stream = stream
        self.kind = sub.topic.kind
        self.sub = sub


class WSConnection:
    """One accepted `/ws` socket: its subscriptions, its reply queue, its reader and its writer."""

    # Slots: thousands of these live for hours, and every publish touches each one's flags.
    __slots__ = ("_aborted", "_parked", "_queued", "_writer", "admitted", "bytes_sent", "clock", "close_code",
                 "close_text", "consumer", "events_sent", "frames", "owner", "rate", "receive", "replies", "send",
                 "strikes", "subs", "wake")

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
        self.consumer = admitted.principal.consumer
        self.clock = owner.clock
        config = owner.config
        self.subs: dict[str, _Watch] = {}
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
        self.events_sent = 0
        self.bytes_sent = 0  # event payload characters (ASCII JSON: bytes)

    # -- lifecycle --------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run reader and writer until one ends; release every subscription whatever happens."""
        loop = asyncio.get_running_loop()
        expires_in = max(0.0, self.admitted.principal.valid_until - self.owner.wall_clock())
        expiry = loop.call_later(expires_in, self.close, TOKEN_EXPIRED)
        reader = loop.create_task(self._read())
        writer = self._writer = loop.create_task(self._write())
        started = self.clock()
        log.info("websocket opened", extra={"transport": "ws"})
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
            expiry.cancel()
            for task in (reader, writer):
                task.cancel()
            for stream in list(self.subs):
                self._remove(stream)
            log.info("websocket closed", extra={
                "transport": "ws", "duration": round(self.clock() - started, 3), "events": self.events_sent,
                "bytes": self.bytes_sent,
                "close_code": self.close_code if self.close_code is not None else "client_closed"})

    def close(self, reason: CloseReason) -> None:
        """Close the whole socket with `reason`'s WebSocket code (the writer sends it)."""
        self._shut(reason.ws_code, reason.code, reason)

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
            await owner.admission.authorize(self.admitted, stream)
            if self.close_code is not None or stream in self.subs:
                return
            if owner.draining:
                self.close(SHUTTING_DOWN)
                return
            owner.exclusive.check(self.consumer, stream)
            owner.quota.check(self.consumer, stream)
            sub = owner.hub.subscribe(stream, command.after_event_id, self.consumer)
            owner.quota.acquire(self.consumer, stream)  # checked above, with nothing awaited since
            try:
                await owner.exclusive.acquire(self.consumer, stream, sub)
            except BaseException:
                owner.quota.release(self.consumer, stream)
                owner.hub.unsubscribe(sub)
                raise
        except StreamUnavailable as exc:
            owner.metrics.limit_rejections.labels("max_streams").inc()
            self._reply(proto.error("over_capacity", str(exc), stream))
            return
        except GatewayError as exc:
            if isinstance(exc, LimitError):
                owner.metrics.limit_rejections.labels(exc.reason).inc()
            self._reply(proto.error(exc.code, exc.message, stream))
            return
        watch = _Watch(stream, sub)
        self.subs[stream] = watch
        sub.wake = self._on_wake
        sub.abort = self._abort
        if self.frames is not None:
            # The topic's pass may write this subscription's frames itself while the writer is parked.
            sub.direct, sub.ws, sub.tally = self, True, owner.deliveries
        owner.metrics.subscribers.labels("ws", watch.kind).inc()
        self._reply(proto.subscribed(stream))
        self.wake.set()  # in case it was superseded while the claim was being taken

    def _remove(self, stream: str) -> _Watch | None:
        watch = self.subs.pop(stream, None)
        if watch is None:
            return None
        sub = watch.sub
        sub.wake = _noop
        sub.abort = _noop
        sub.direct = sub.tally = None
        self.events_sent += sub.sent_events
        self.bytes_sent += sub.sent_bytes
        self.owner.hub.unsubscribe(sub)
        self.owner.exclusive.leave(self.consumer, stream, sub)
        self.owner.quota.release(self.consumer, stream)
        self.owner.metrics.subscribers.labels("ws", watch.kind).dec()
        return watch

    def _end(self, watch: _Watch, reason: CloseReason | None, detail: str | None = None) -> None:
        """End one subscription: an `error` frame with the reason (if the gateway ended it), then `unsubscribed`."""
        if self._remove(watch.stream) is None:
            return
        if reason is not None:
            self.owner.metrics.closes.labels(reason.code).inc()
            topic = watch.sub.topic
            poll = (f"/api/v1/{topic.kind}/{topic.resource_id}"
                    if reason is INACTIVITY_TIMEOUT and topic.kind != JOB_KIND else None)
            self._reply(proto.error(reason.code, reason.message, watch.stream, reconnect=reason.reconnect,
                                    lastEventId=id_value(watch.sub.last_id()), detail=detail, poll=poll))
        self._reply(proto.unsubscribed(watch.stream))

    def _announce_continuity_lost(self, watch: _Watch) -> None:
        """Sent after `subscribed` and before the retained history, like SSE's `gateway.continuity_lost`."""
        topic = watch.sub.topic
        first = topic.events[0].id if topic.events else None
        self._reply(proto.error("continuity_lost", "the requested position is no longer available; "
                                "the retained history follows", watch.stream,
                                reason=watch.sub.continuity_lost, oldestRetainedId=id_value(first)))
        watch.sub.continuity_lost = None  # told; a later hole is told again

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
            elif isinstance(command, proto.Unsubscribe):
                self._remove(command.stream)
                self._reply(proto.unsubscribed(command.stream))
            else:
                await self._subscribe(command)

    def _strike(self, reply: str) -> None:
        """Answer a refused message; past the tolerance the socket is closed for abuse."""
        if self.strikes.allow():
            self._reply(reply)
        else:
            self.close(POLICY_VIOLATION)

    # -- writer -----------------------------------------------------------------------------------

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
                topic = sub.topic
                if sub.closed or (topic.ended and sub.drained) or (
                        now - sub.last_delivery >= inactivity and not topic.paused):
                    break
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
                    self._end(watch, reason)
                    busy = True
                    continue
                if sub.continuity_lost:
                    self._announce_continuity_lost(watch)
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
                topic = sub.topic
                if sub.closed:
                    busy = True
                elif topic.ended and sub.drained:
                    self._end(watch, topic.end_reason, topic.end_detail)
                    busy = True
                elif clock() - sub.last_delivery >= inactivity and not topic.paused:
                    # A paused job does not count: its browser waits on a human and must see job_resumed.
                    sub.close(INACTIVITY_TIMEOUT)
                    busy = True
            if self.frames is not None and self.frames.paused and self.close_code is None:
                await self._drain()
            elif not busy and not self.replies and self.close_code is None:
                self._parked = True
                try:
                    await self.wake.wait()
                finally:
                    self._parked = False

