"""Browser SSE streams: a raw ASGI endpoint, one coroutine per subscriber.

The endpoint bypasses framework response classes on purpose: per subscriber it keeps
one task (the server's), one tiny disconnect watcher and one `Subscription`. Each
wake-up writes every pending frame in a single `send`, so the cost per event shrinks
as load grows. Every close the gateway initiates ends with a `gateway.close` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Generator
from typing import Any
from urllib.parse import parse_qsl

from gateway.admission import Admission, header_map, validate_resource
from gateway.closes import CLOSE_EVENT, CONTINUITY_LOST_EVENT, INACTIVITY_TIMEOUT, TOKEN_EXPIRED, CloseReason
from gateway.config import LimitsConfig
from gateway.errors import GatewayError, LimitError, respond
from gateway.events import Event
from gateway.hub import Hub, StreamUnavailable, Subscription
from gateway.limits import ConnectionLimiter, ExclusiveStreams
from gateway.logs import new_request_id, request_id
from gateway.metrics import Metrics
from gateway.sse import encode_comment, encode_event, encode_retry
from gateway.types import Receive, Scope, Send

log = logging.getLogger("gateway.sse")

_HEARTBEAT = encode_comment()
_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]
#: Observe the fan-out delay on one write in this many (a histogram per write would cost more than the write).
DELAY_SAMPLE_EVERY = 16


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
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.hub = hub
        self.admission = admission
        self.limiter = limiter
        self.exclusive = exclusive
        self.limits = limits
        self.metrics = metrics
        self.clock = clock
        self.wall_clock = wall_clock
        self._writes = 0
        self._pending: list[Callable[[], None]] = []
        self._flush_scheduled = False
        self._frames = metrics.frames_sent.labels("sse")
        self._poll_path = "/api/v1/{kind}/{id}"

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
            after_id = headers.get("last-event-id") or _query_value(scope, "lastEventId")
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
        try:
            if after_id is not None and sub.topic.ended and sub.drained and sub.topic.end_reason is None:
                # Resuming after the terminal event: 204 tells EventSource to stop reconnecting.
                await send({"type": "http.response.start", "status": 204, "headers": cors})
                await send({"type": "http.response.body", "body": b""})
                return
            with self.limiter.hold(consumer, admitted.client_ip):
                try:
                    await self.exclusive.acquire(consumer, resource, sub)
                except LimitError as exc:  # another replica holds this user's stream (reject policy)
                    self.metrics.limit_rejections.labels(exc.reason).inc()
                    await respond(send, exc, cors)
                    return
                labels = self.metrics.subscribers.labels("sse", kind)
                labels.inc()
                started = self.clock()
                try:
                    sent, events = await self._pump(sub, receive, send, cors, admitted.principal.expires_at,
                                                    after_id)
                finally:
                    labels.dec()
                    self.exclusive.leave(consumer, resource, sub)
                code = sub.close_reason.code if sub.close_reason else ("client_closed" if sub.closed else "ended")
                if sub.close_reason is not None:
                    self.metrics.closes.labels(sub.close_reason.code).inc()
                log.info("stream closed", extra={
                    "transport": "sse", "stream_kind": kind, "duration": round(self.clock() - started, 3),
                    "bytes": sent, "events": events, "close_code": code})
        finally:
            self.hub.unsubscribe(sub)

    async def _pump(self, sub: Subscription, receive: Receive, send: Send, cors: list[tuple[bytes, bytes]],
                    expires_at: float, after_id: str | None) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        waiter: asyncio.Future[None] | None = None
        inflight: _Resume | None = None
        queued = False
        told_continuity = False
        sent = 0
        events = 0

        def wake() -> None:
            nonlocal queued
            if waiter is None or waiter.done():
                return
            if inflight is None and not sub.closed and (told_continuity or not sub.continuity_lost):
                # The pump is parked: deliver from one shared flush per loop iteration instead of
                # waking this task (no future, no task switch per subscriber per event).
                if not queued:
                    queued = True
                    self._queue(flush)
                return
            waiter.set_result(None)

        def flush() -> None:
            # Runs after every event of the current upstream read was published, so one write
            # carries all of them. A send that cannot finish at once is completed by the pump.
            nonlocal inflight, queued, sent, events
            queued = False
            if waiter is None or waiter.done():
                return
            if inflight is None and not sub.closed and (told_continuity or not sub.continuity_lost):
                taken = sub.take()
                if taken is not None:
                    chunk, batch = taken
                    sub.last_delivery = sub.last_write = self.clock()
                    sent += len(chunk)
                    events += len(batch)
                    self._delivered(batch)
                    steps = send({"type": "http.response.body", "body": chunk, "more_body": True}).__await__()
                    try:
                        blocked = next(steps)
                    except StopIteration:
                        if not sub.topic.ended:
                            return
                    except BaseException as exc:  # raised again in the pump task
                        inflight = _Resume(None, None, exc)
                    else:
                        sub.sending_since = self.clock()
                        inflight = _Resume(steps, blocked)
            waiter.set_result(None)

        aborted = False

        def abort() -> None:
            nonlocal aborted
            aborted = True
            task.cancel()

        sub.wake = wake
        sub.abort = abort
        watcher = loop.create_task(_watch_disconnect(receive, sub))
        expiry = loop.call_later(max(0.0, expires_at - self.wall_clock()), sub.close, TOKEN_EXPIRED)
        limits = self.limits
        topic = sub.topic
        log.info("stream opened", extra={"transport": "sse", "stream_kind": topic.kind, "resume": after_id is not None})
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _STREAM_HEADERS + cors})
            # Jittered reconnect delay so a gateway restart does not bring every browser back at once.
            first = encode_retry(random.randint(1000, 5000))
            await send({"type": "http.response.body", "body": first, "more_body": True})
            while True:
                if inflight is not None:
                    await inflight
                    inflight = None
                    sub.sending_since = 0.0
                if sub.continuity_lost and not told_continuity:
                    # At the start, or later when a resume that waited for its id learns it is gone.
                    told_continuity = True
                    await send({"type": "http.response.body", "body": continuity_frame(sub), "more_body": True})
                if sub.closed:
                    if sub.close_reason is not None:
                        frame = close_frame(sub.close_reason, sub, poll=self._poll_url(sub))
                        await send({"type": "http.response.body", "body": frame, "more_body": True})
                    break
                taken = sub.take()
                if taken is not None:
                    chunk, batch = taken
                    now = self.clock()
                    sub.sending_since = now
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    sub.sending_since = 0.0
                    sub.last_delivery = sub.last_write = now
                    sent += len(chunk)
                    events += len(batch)
                    self._delivered(batch)
                    continue
                if topic.ended and sub.drained:
                    if topic.end_reason is not None:
                        frame = close_frame(topic.end_reason, sub, detail=topic.end_detail)
                        self.metrics.closes.labels(topic.end_reason.code).inc()
                        await send({"type": "http.response.body", "body": frame, "more_body": True})
                    break
                now = self.clock()
                if now - sub.last_delivery >= limits.inactivity_timeout and not topic.paused:
                    sub.close(INACTIVITY_TIMEOUT)
                    continue
                if now - sub.last_write >= limits.heartbeat * 0.9:
                    sub.last_write = now
                    await send({"type": "http.response.body", "body": _HEARTBEAT, "more_body": True})
                waiter = loop.create_future()
                await waiter
                waiter = None
        except asyncio.CancelledError:
            if not aborted:
                raise
            task.uncancel()
            self.metrics.slow_consumers.inc()
        finally:
            sub.wake = _noop
            expiry.cancel()
            watcher.cancel()
        if sub.close_reason is not None and sub.close_reason.code == "slow_consumer" and not aborted:
            self.metrics.slow_consumers.inc()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        return sent, events

    def _queue(self, flush: Callable[[], None]) -> None:
        self._pending.append(flush)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._flush_scheduled = False
        for flush in pending:
            flush()

    def _delivered(self, batch: list[Event]) -> None:
        self._frames.inc(len(batch))
        self._writes += 1
        if self._writes % DELAY_SAMPLE_EVERY == 0:
            self.metrics.fanout_delay.observe(self.clock() - batch[-1].received_at)

    def _poll_url(self, sub: Subscription) -> str | None:
        if sub.close_reason is INACTIVITY_TIMEOUT and sub.topic.kind != "optimizations":
            return f"/api/v1/{sub.topic.kind}/{sub.topic.resource_id}"
        return None


def _noop() -> None:
    return None


class _Resume:
    """Completes, inside the pump task, a `send` that a flush started and that had to wait."""

    __slots__ = ("blocked", "error", "steps")

    def __init__(self, steps: Generator[Any, None, None] | None, blocked: Any,
                 error: BaseException | None = None) -> None:
        self.steps = steps
        self.blocked = blocked
        self.error = error

    def __await__(self) -> Generator[Any, None, None]:
        if self.error is not None or self.steps is None:
            raise self.error or RuntimeError("nothing to resume")
        yield self.blocked  # the future the send waits on (the transport draining)
        yield from self.steps


async def _watch_disconnect(receive: Receive, sub: Subscription) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            sub.close(None)
            return


def _query_value(scope: Scope, name: str) -> str | None:
    raw = scope.get("query_string", b"")
    if not raw:
        return None
    for key, value in parse_qsl(raw.decode("latin-1")):
        if key == name:
            return str(value)
    return None
