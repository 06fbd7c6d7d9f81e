"""Browser SSE streams: admitted through ASGI, then driven by callbacks on the socket.

Admission (token, authorization, limits, the one-stream rule) runs as an ordinary ASGI
request, so every refusal keeps its normal HTTP response. An admitted stream then has no
task of its own. Its output is the subscription's `direct` output, so the topic's pass
writes new frames to it while it is caught up (`Topic.flush`); anything else (the history
of a resume, a continuity notice, the goodbye, a heartbeat, a drained socket) goes through
`wake`, which queues the stream for the same pass, and `flush`, which writes every pending
frame with one write. Under the gateway's uvicorn protocol the socket itself is the output
(`gateway.direct`), so the bytes the hub joined once go to every subscriber as they are;
other servers get the same stream over `send`.
Every close the gateway initiates ends with a `gateway.close` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from urllib.parse import parse_qsl

from gateway.auth.address import header_map
from gateway.auth.admission import Admission, validate_resource
from gateway.codec.closes import CLOSE_EVENT, CONTINUITY_LOST_EVENT, INACTIVITY_TIMEOUT, CloseReason
from gateway.codec.sse import encode_comment, encode_event, encode_retry
from gateway.codec.streams import JOB_KIND, resume_id
from gateway.config import LimitsConfig
from gateway.errors import GatewayError, LimitError, respond
from gateway.hub.ports import StreamUnavailable
from gateway.hub.registry import Hub
from gateway.hub.subscription import Subscription
from gateway.limits.connections import ConnectionLimiter
from gateway.limits.exclusive import ExclusiveStreams
from gateway.limits.quota import StreamQuota
from gateway.logs import new_request_id, request_id
from gateway.metrics import Deliveries, Metrics
from gateway.transports.direct import Output, Sink, detacher
from gateway.types import Receive, Scope, Send

log = logging.getLogger("gateway.sse")

_HEARTBEAT = encode_comment()
_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]
#: Bytes the `send` fallback buffers before it reports itself paused (the socket's own limit, for direct output).
FALLBACK_HIGH_WATER = 1 << 16


def close_frame(reason: CloseReason, sub: Subscription, detail: str | None = None, **extra: object) -> bytes:
    """The final `gateway.close` event (no `id:`, so the client's resume point stays put)."""
    return encode_event(reason.payload(lastEventId=sub.last_id(), detail=detail, **extra), event=CLOSE_EVENT)


def continuity_frame(sub: Subscription) -> bytes:
    topic = sub.topic
    first = topic.events[0].id if topic.events else None
    payload = (
        '{"code":"continuity_lost","reason":"' + (sub.continuity_lost or "unknown") + '"'
        + (',"oldestRetainedId":' + _json_str(first) if first is not None else "") + "}"
    )
    return encode_event(payload, event=CONTINUITY_LOST_EVENT)


def _json_str(value: str) -> str:
    return json.dumps(value)


class SSEStreams:
    """`GET /api/v1/{kind}/{id}/stream` for browsers."""

    def __init__(self, hub: Hub, admission: Admission, limiter: ConnectionLimiter, exclusive: ExclusiveStreams,
                 limits: LimitsConfig, metrics: Metrics, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, quota: StreamQuota | None = None) -> None:
        self.hub = hub
        self.admission = admission
        self.limiter = limiter
        self.exclusive = exclusive
        self.quota = quota or StreamQuota(limits.max_streams_per_consumer)
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self.wall_clock = wall_clock
        self.flushes = hub.flushes
        self.deliveries = Deliveries(metrics.frames_sent.labels("sse"), metrics.fanout_delay, clock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send, kind: str, resource_id: str) -> None:
        token = request_id.set(new_request_id())
        try:
            await self._handle(scope, receive, send, kind, resource_id)
        finally:
            request_id.reset(token)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, kind: str, resource_id: str) -> None:
        headers = header_map(scope)
        cors = self.admission.cors_headers(headers.get("origin"), scope, headers)
        try:
            resource = validate_resource(kind, resource_id)
            admitted = await self.admission.admit(scope, headers, resource)
            consumer = admitted.principal.consumer
            self.limiter.check(consumer, admitted.client_ip)
            self.exclusive.check(consumer, resource)
            self.quota.check(consumer, resource)
            after_id = resume_id(headers.get("last-event-id") or _query_value(scope, "lastEventId"))
            sub = self.hub.subscribe(resource, after_id, consumer)
        except LimitError as exc:
            self.metrics.limit_rejections.labels(exc.reason).inc()
            log.info("stream refused", extra={"transport": "sse", "status": exc.status, "code": exc.code})
            await respond(send, exc, cors)
            return
        except StreamUnavailable as exc:
            self.metrics.limit_rejections.labels("max_streams").inc()
            await respond(send, LimitError(str(exc), status=503, code="over_capacity", retry_after=5,
                                           reason="max_streams"), cors)
            return
        except GatewayError as exc:
            log.info("stream refused", extra={"transport": "sse", "status": exc.status, "code": exc.code,
                                              "reason": exc.reason})
            await respond(send, exc, cors)
            return
        stream: _Stream | None = None
        ip = admitted.client_ip
        try:
            if after_id is not None and sub.topic.ended and sub.drained and sub.topic.end_reason is None:
                # Resuming after the terminal event: 204 tells EventSource to stop reconnecting.
                await send({"type": "http.response.start", "status": 204, "headers": cors})
                await send({"type": "http.response.body", "body": b""})
                return
            self.limiter.acquire(consumer, ip)
            self.quota.acquire(consumer, resource)  # checked above, with nothing awaited since
            try:
                await self.exclusive.acquire(consumer, resource, sub)
            except BaseException as exc:
                self.quota.release(consumer, resource)
                self.limiter.release(consumer, ip)
                if not isinstance(exc, LimitError):
                    raise
                # Another replica holds this user's stream (reject policy).
                self.metrics.limit_rejections.labels(exc.reason).inc()
                await respond(send, exc, cors)
                return
            stream = _Stream(self, sub, consumer, ip, resource, admitted.principal.valid_until)
        finally:
            if stream is None:
                self.hub.unsubscribe(sub)
        await stream.run(scope, receive, send, _STREAM_HEADERS + cors, after_id)


class _Stream:
    """One admitted subscriber: its subscription, its output and the state between writes."""

    __slots__ = ("aborted", "consumer", "done", "expires_at", "ip", "out", "owner",
                 "queued", "resource", "rid", "started", "sub")

    def __init__(self, owner: SSEStreams, sub: Subscription, consumer: str, ip: str, resource: str,
                 expires_at: float) -> None:
        self.owner = owner
        self.sub = sub
        self.consumer = consumer
        self.ip = ip
        self.resource = resource
        self.expires_at = expires_at
        self.rid = request_id.get()
        self.out: Output | None = None
        self.queued = False
        self.done = False
        self.aborted = False
        self.started = owner.clock()

    async def run(self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]],
                  after_id: str | None) -> None:
        """Start writing; returns at once on a direct socket, or when the stream ends over `send`."""
        log.info("stream opened", extra={"transport": "sse", "stream_kind": self.sub.topic.kind,
                                         "resume": after_id is not None})
        detach = detacher(scope)
        try:
            out = detach(self, 200, headers) if detach is not None else None
        except BaseException:
            self.lost()  # release what admission took
            raise
        if out is not None:
            self._start(out)
            return
        fallback = _SendOutput(self, send, receive)
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
        sub.deadline = owner.clock() + max(0.0, self.expires_at - owner.wall_clock())
        owner.metrics.subscribers.labels("sse", sub.topic.kind).inc()
        # Jittered reconnect delay so a gateway restart does not bring every browser back at once.
        out.write(encode_retry(random.randint(1000, 5000)))
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
        if sub.continuity_lost:
            # At the start, or later: a resume that waited for its id learns it is gone, or the
            # feed could not deliver some events (each such hole is told once, where it is).
            out.write(continuity_frame(sub))
            sub.continuity_lost = None
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
        if not sub.closed:
            if topic.ended and sub.drained:
                if topic.end_reason is not None:
                    out.write(close_frame(topic.end_reason, sub, detail=topic.end_detail))
                    owner.metrics.closes.labels(topic.end_reason.code).inc()
                self._end()
                return
            if now - sub.last_delivery >= owner.limits.inactivity_timeout and not topic.paused:
                sub.close(INACTIVITY_TIMEOUT)
        if sub.closed:
            if sub.close_reason is not None:
                out.write(close_frame(sub.close_reason, sub, poll=self._poll_url()))
            self._end()
            return
        if now - sub.last_write >= owner.limits.heartbeat * 0.9:
            sub.last_write = now
            out.write(_HEARTBEAT)

    def _poll_url(self) -> str | None:
        topic = self.sub.topic
        if self.sub.close_reason is INACTIVITY_TIMEOUT and topic.kind != JOB_KIND:
            return f"/api/v1/{topic.kind}/{topic.resource_id}"
        return None

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
        if self.out is not None:
            owner.metrics.subscribers.labels("sse", sub.topic.kind).dec()
        owner.exclusive.leave(self.consumer, self.resource, sub)
        owner.quota.release(self.consumer, self.resource)
        owner.limiter.release(self.consumer, self.ip)
        owner.hub.unsubscribe(sub)
        if reason is not None:
            owner.metrics.closes.labels(reason.code).inc()
        if self.aborted or (reason is not None and reason.code == "slow_consumer"):
            owner.metrics.slow_consumers.inc()
        token = request_id.set(self.rid)
        try:
            log.info("stream closed", extra={
                "transport": "sse", "stream_kind": sub.topic.kind, "duration": round(owner.clock() - self.started, 3),
                "bytes": sub.sent_bytes, "events": sub.sent_events, "close_code": code})
        finally:
            request_id.reset(token)


class _SendOutput:
    """The `Output` seam over ASGI `send`, for servers that do not offer `gateway.direct`.

    Writes collect in a buffer that one loop in the request's task sends; the buffer
    reports itself paused past `FALLBACK_HIGH_WATER`, as a socket would.
    """

    def __init__(self, sink: Sink, send: Send, receive: Receive) -> None:
        self._sink = sink
        self._send = send
        self._receive = receive
        self._buffer: list[bytes] = []
        self._size = 0
        self._ready = asyncio.Event()
        self._closing = False
        self._gone = False
        self._task: asyncio.Task[object] | None = None

    @property
    def paused(self) -> bool:
        return self._size >= FALLBACK_HIGH_WATER

    def write(self, data: bytes) -> None:
        if data and not self._closing:
            self._buffer.append(data)
            self._size += len(data)
            self._ready.set()

    def close(self) -> None:
        self._closing = True
        self._ready.set()

    def abort(self) -> None:
        self._gone = True
        self._ready.set()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def run(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Send the head, then whatever is written, until the stream closes or the client leaves."""
        task = self._task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(self._watch())
        try:
            await self._send({"type": "http.response.start", "status": 200, "headers": headers})
            while not self._gone:
                if self._buffer:
                    was_paused = self.paused
                    body = b"".join(self._buffer)
                    self._buffer.clear()
                    self._size = 0
                    await self._send({"type": "http.response.body", "body": body, "more_body": True})
                    if was_paused:
                        self._sink.writable()
                elif self._closing:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(1.0):
                            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                else:
                    await self._ready.wait()
                    self._ready.clear()
        except asyncio.CancelledError:
            if not self._gone:
                raise
            task.uncancel()
        finally:
            watcher.cancel()

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._gone = True
                self._ready.set()
                self._sink.lost()
                return


def _noop() -> None:
    return None


def _query_value(scope: Scope, name: str) -> str | None:
    raw = scope.get("query_string", b"")
    if not raw:
        return None
    for key, value in parse_qsl(raw.decode("latin-1")):
        if key == name:
            return str(value)
    return None
