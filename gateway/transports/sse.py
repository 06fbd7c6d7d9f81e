"""Browser SSE streams: admitted through ASGI, then driven by callbacks on the socket.

Admission (`auth.admission`) runs as an ordinary ASGI request, so every refusal keeps its
normal HTTP response. An admitted stream then has no task of its own. Its output is the
subscription's `direct` output, so the topic's pass writes new frames to it while it is
caught up (`Topic.flush`); anything else (the history of a resume, a continuity notice, the
goodbye, a heartbeat, a drained socket) goes through `wake`, which queues the stream for the
same pass, and `flush`, which writes every pending frame with one write. Under the gateway's
uvicorn protocol the socket itself is the output (`transports.direct`), so the bytes the hub
joined once go to every subscriber as they are; other servers get the same stream over
`send` (`transports.sse_fallback`). Every close the gateway initiates ends with a
`gateway.close` event (`transports.ending` decides when).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable

from gateway.auth.address import header_map, query_value
from gateway.auth.admission import Admission, ConnectionHold, StreamHold, validate_resource
from gateway.codec.closes import CLOSE_EVENT, CONTINUITY_LOST_EVENT, TOKEN_EXPIRED
from gateway.codec.sse import encode_comment, encode_event, encode_retry
from gateway.codec.streams import KINDS, resume_id
from gateway.config import LimitsConfig
from gateway.errors import GatewayError, respond
from gateway.logs import new_request_id, request_id
from gateway.metrics import Deliveries, Metrics
from gateway.transports.direct import Output, detacher
from gateway.transports.ending import Ending, Expiries, Expiry, continuity_notice, ending
from gateway.transports.sse_fallback import SendOutput
from gateway.types import Receive, Scope, Send

log = logging.getLogger("gateway.sse")

_HEARTBEAT = encode_comment()
_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]


def close_frame(end: Ending) -> bytes:
    """The final `gateway.close` event (no `id:`, so the client's resume point stays put)."""
    assert end.reason is not None
    return encode_event(end.reason.payload(lastEventId=end.last_event_id, detail=end.detail, poll=end.poll),
                        event=CLOSE_EVENT)


def continuity_frame(reason: str, oldest: str | None) -> bytes:
    payload = ('{"code":"continuity_lost","reason":' + json.dumps(reason)
               + (',"oldestRetainedId":' + json.dumps(oldest) if oldest is not None else "") + "}")
    return encode_event(payload, event=CONTINUITY_LOST_EVENT)


class SSEStreams:
    """`GET /api/v1/{kind}/{id}/stream` for browsers."""

    def __init__(self, admission: Admission, limits: LimitsConfig, metrics: Metrics, expiries: Expiries,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.admission = admission
        self.hub = admission.hub
        self.limits = limits
        self.metrics = metrics
        self.expiries = expiries
        self.clock = clock
        self.flushes = self.hub.flushes
        self.deliveries = Deliveries(metrics.frames_sent.labels("sse"), metrics.fanout_delay, clock)
        #: The subscriber gauge's children, looked up once rather than per stream.
        self.subscribers = {kind: metrics.subscribers.labels("sse", kind) for kind in KINDS}

    async def __call__(self, scope: Scope, receive: Receive, send: Send, kind: str, resource_id: str) -> None:
        token = request_id.set(new_request_id())
        try:
            await self._handle(scope, receive, send, kind, resource_id)
        finally:
            request_id.reset(token)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, kind: str, resource_id: str) -> None:
        admission = self.admission
        headers = header_map(scope)
        cors = admission.cors_headers(headers.get("origin"), scope, headers)
        connection: ConnectionHold | None = None
        try:
            resource = validate_resource(kind, resource_id)
            admitted = await admission.admit(scope, headers)
            connection = admission.connection(admitted)
            after_id = resume_id(headers.get("last-event-id") or query_value(scope, "lastEventId"))
            hold = await admission.join(admitted, resource, after_id)
            sub = hold.sub
            if after_id is not None and sub.topic.ended and sub.drained and sub.topic.end_reason is None:
                # Resuming after the terminal event: 204 tells EventSource to stop reconnecting.
                hold.release()
                connection.release()
                await send({"type": "http.response.start", "status": 204, "headers": cors})
                await send({"type": "http.response.body", "body": b""})
                return
            await hold.claim()
        except GatewayError as exc:
            if connection is not None:
                connection.release()
            log.info("stream refused", extra={"transport": "sse", "status": exc.status, "code": exc.code,
                                              "reason": exc.reason})
            await respond(send, exc, cors)
            return
        except BaseException:
            if connection is not None:
                connection.release()
            raise
        stream = _Stream(self, hold, connection, admitted.principal.valid_until)
        await stream.run(scope, receive, send, _STREAM_HEADERS + cors, after_id)


class _Stream:
    """One admitted subscriber: what it holds, its output and the state between writes."""

    __slots__ = ("aborted", "connection", "done", "expiry", "hold", "out", "owner", "queued", "rid", "started",
                 "sub", "valid_until")

    def __init__(self, owner: SSEStreams, hold: StreamHold, connection: ConnectionHold, valid_until: float) -> None:
        self.owner = owner
        self.hold = hold
        self.connection = connection
        self.sub = hold.sub
        self.valid_until = valid_until
        self.expiry: Expiry | None = None
        self.rid = request_id.get()
        self.out: Output | None = None
        self.queued = False
        self.done = False
        self.aborted = False
        self.started = owner.clock()

    async def run(self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]],
                  after_id: str | None) -> None:
        """Start writing; returns at once on a direct socket, or when the stream ends over `send`."""
        # Per-stream lines are debug: at info, a reconnect storm would spend its time writing logs.
        log.debug("stream opened", extra={"transport": "sse", "stream_kind": self.sub.topic.kind,
                                         "resume": after_id is not None})
        # Jittered reconnect delay so a gateway restart does not bring every browser back at once.
        retry = encode_retry(random.randint(1000, 5000))
        detach = detacher(scope)
        try:
            out = detach(self, 200, headers, retry) if detach is not None else None
        except BaseException:
            self.lost()  # release what admission took
            raise
        if out is not None:
            self._start(out)
            return
        fallback = SendOutput(self, send, receive)
        fallback.write(retry)
        try:
            self._start(fallback)
            await fallback.run(headers)
        finally:
            self.lost()

    def _start(self, out: Output) -> None:
        owner = self.owner
        self.out = out
        sub = self.sub
        sub.wake = self.wake
        sub.abort = self.abort
        sub.direct = out  # the topic's pass may write the joined frames itself (see `Topic.flush`)
        sub.tally = owner.deliveries
        sub.transport = "sse"
        self.expiry = owner.expiries.schedule(self.valid_until, self.expire)
        owner.subscribers[sub.topic.kind].inc()
        self.flush()

    # --- the hub's and the socket's callbacks ---------------------------------------

    def wake(self) -> None:
        if not self.queued and not self.done:
            self.queued = True
            self.owner.flushes.add(self)

    def writable(self) -> None:
        self.sub.sending_since = 0.0
        self.flush()

    def lost(self) -> None:
        if not self.done:
            self.sub.close(None)
            self._finish()

    def abort(self) -> None:
        """Stuck in a write for longer than `send_timeout` (the hub's sweep): drop the connection."""
        if not self.done:
            self.aborted = True
            if self.out is not None:
                self.out.abort()
            self._finish()

    def expire(self) -> None:
        """The token passed `exp + leeway` (`Expiries`): the stream ends as `token_expired`."""
        self.sub.close(TOKEN_EXPIRED)

    # --- writing ---------------------------------------------------------------------

    def flush(self) -> None:
        """Write what is due: continuity signal, pending frames, the goodbye, or a heartbeat."""
        self.queued = False
        out = self.out
        if self.done or out is None:
            return
        sub = self.sub
        owner = self.owner
        now = owner.clock()
        if out.paused and not sub.closed:
            # The socket is full: leave the frames in the shared log until it drains.
            if not sub.sending_since:
                sub.sending_since = now
            return
        notice = continuity_notice(sub)
        if notice is not None:
            # At the start, or later: a resume that waited for its id learns it is gone, or the
            # feed could not deliver some events (each such hole is told once, where it is).
            out.write(continuity_frame(*notice))
        topic = sub.topic
        if not sub.closed:
            while (taken := sub.take()) is not None:
                chunk, batch = taken
                out.write(chunk)
                sub.last_delivery = sub.last_write = now
                sub.sent_bytes += len(chunk)
                sub.sent_events += len(batch)
                owner.deliveries.delivered(1, batch)
                if out.paused:
                    if not sub.sending_since:
                        sub.sending_since = now
                    return
                if sub.cursor >= topic.head and not topic.ended:
                    return  # the common case: all caught up, just written (no goodbye, no heartbeat due)
        end = ending(sub, now, owner.limits.inactivity_timeout)
        if end is not None:
            if end.reason is not None:
                out.write(close_frame(end))
                if not sub.closed:  # the stream's own end (an upstream failure); a closed sub counts in _finish
                    owner.metrics.closes.labels(end.reason.code).inc()
            self._end()
            return
        if now - sub.last_write >= owner.limits.heartbeat * 0.9:
            sub.last_write = now
            out.write(_HEARTBEAT)

    def _end(self) -> None:
        if self.out is not None:
            self.out.close()
        self._finish()

    def _finish(self) -> None:
        """Release everything the stream held, once, however it ended."""
        if self.done:
            return
        self.done = True
        owner = self.owner
        sub = self.sub
        reason = sub.close_reason
        code = reason.code if reason else ("client_closed" if sub.closed else "ended")
        sub.wake = _noop
        sub.abort = _noop
        sub.direct = sub.tally = None
        if self.expiry is not None:
            self.expiry.cancel()
        if self.out is not None:
            owner.subscribers[sub.topic.kind].dec()
        self.hold.release()
        self.connection.release()
        if reason is not None:
            owner.metrics.closes.labels(reason.code).inc()
        if self.aborted or (reason is not None and reason.code == "slow_consumer"):
            owner.metrics.slow_consumers.inc()
        token = request_id.set(self.rid)
        try:
            log.debug("stream closed", extra={
                "transport": "sse", "stream_kind": sub.topic.kind, "duration": round(owner.clock() - self.started, 3),
                "bytes": sub.sent_bytes, "events": sub.sent_events, "close_code": code})
        finally:
            request_id.reset(token)


def _noop() -> None:
    return None
