"""The upstream side: one resilient SSE connection per evaluation stream.

`SSEFeed` keeps one upstream stream open for one topic until the stream ends. After a
drop, an inactivity close, a timeout or a 5xx it reconnects with full-jitter backoff
and `Last-Event-ID`, honouring `retry:` and `Retry-After`, and drops anything it has
already published, so subscribers see neither a gap nor a duplicate. 409 and 429 mean
"not yet" (the upstream still holds our previous stream, or rate-limits us). Other
4xx answers end the stream for its browsers with an error that never carries the key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import httpx

from gateway.codec.closes import UPSTREAM_FAILED
from gateway.codec.events import Event
from gateway.codec.sse import EventTooLarge, SSEDecoder
from gateway.config import UpstreamConfig
from gateway.hub.ports import FeedTarget
from gateway.metrics import Metrics
from gateway.upstream.answers import RETRYABLE_STATUS, read_prefix, redirect_target, upstream_error_code
from gateway.upstream.backoff import Backoff, parse_retry_after
from gateway.upstream.health import UpstreamHealth

log = logging.getLogger("gateway.upstream")

_RETRYABLE = RETRYABLE_STATUS

FeedState = Literal["connecting", "open", "backing_off", "ended"]


class FeedError(Exception):
    """The upstream answered in a way that ends the stream (401/403/404 and other final 4xx)."""


def refuse_redirect(status: int, location: str | None, stream_kind: str) -> FeedError:
    """A 3xx from the upstream is a failure: the API key goes only to `upstream.base_url`'s origin."""
    log.warning("upstream redirect refused", extra={
        "stream_kind": stream_kind, "status": status, "location_origin": redirect_target(location)})
    return FeedError(f"upstream answered {status} (a redirect; the gateway does not follow redirects)")


class SSEFeed:
    """Feeds one topic from one upstream SSE stream, reconnecting until the stream ends."""

    def __init__(self, topic: FeedTarget, client: httpx.AsyncClient, config: UpstreamConfig, metrics: Metrics,
                 clock: Callable[[], float], backoff: Backoff | None = None,
                 health: UpstreamHealth | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.topic = topic
        #: How a reconnect delay is waited out (injected by tests to see the delays chosen).
        self.sleep = sleep
        self.client = client
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.health = health or UpstreamHealth(clock)
        self.url = f"{config.base_url}/api/v1/{topic.kind}/{topic.resource_id}/stream"
        self.backoff = backoff or Backoff(config.backoff_initial, config.backoff_max)
        self.retry_hint: float = 0.0
        self.upstream_ids = True
        self.connected = asyncio.Event()
        #: What the feed is doing, for operators (`describe`); `retry_at` is on `clock` while backing off.
        self.state: FeedState = "connecting"
        self.retry_at: float | None = None
        self.last_reason: str | None = None

    def describe(self) -> dict[str, Any]:
        """The feed's state for the admin API: connecting, open, backing_off (attempt, next retry) or ended."""
        retry_in = None if self.retry_at is None else round(max(0.0, self.retry_at - self.clock()), 3)
        return {"state": "ended" if self.topic.ended else self.state, "attempt": self.backoff.attempt,
                "retry_in": retry_in, "last_reconnect_reason": self.last_reason}

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self.state, self.retry_at = "ended", None

    async def _run(self) -> None:
        reason = "initial"
        topic = self.topic
        while not topic.ended:
            self.metrics.upstream_connects.labels(topic.kind, reason).inc()
            self.state, self.retry_at = "connecting", None
            delay_floor = 0.0
            try:
                published = await self._connect_once()
                if topic.ended:
                    return
                if published:
                    self.backoff.reset()
                reason = "eof"
                delay_floor = self.retry_hint
            except FeedError as exc:
                log.warning("upstream stream ended", extra={"stream_kind": topic.kind, "detail": str(exc)})
                topic.end(UPSTREAM_FAILED, str(exc))
                return
            except _Retry as exc:
                reason = exc.reason
                delay_floor = exc.retry_after
            except httpx.TimeoutException:
                reason = "timeout"
            except (httpx.TransportError, httpx.StreamError):
                reason = "error"
            if reason in ("timeout", "error", "http_5xx"):
                self.health.failure(reason)
            delay = self.backoff.next(delay_floor)
            log.info("upstream reconnect scheduled", extra={
                "stream_kind": topic.kind, "reason": reason, "delay": round(delay, 3),
                "attempt": self.backoff.attempt})
            self.state, self.retry_at, self.last_reason = "backing_off", self.clock() + delay, reason
            await self.sleep(delay)

    async def _connect_once(self) -> int:
        headers = {b"accept": b"text/event-stream", b"x-api-key": (self.config.api_key or "").encode(),
                   b"cache-control": b"no-store"}
        last = self.topic.last_id
        if last is not None and self.upstream_ids:
            # The id as the upstream sent it: its UTF-8 bytes (an `id:` line never holds CR, LF or NUL).
            headers[b"last-event-id"] = last.encode()
        timeout = httpx.Timeout(self.config.read_timeout, connect=self.config.connect_timeout)
        async with self.client.stream("GET", self.url, headers=headers, timeout=timeout,
                                      follow_redirects=False) as response:
            status = response.status_code
            if status < 500:
                self.health.success()
            if 300 <= status < 400:
                raise refuse_redirect(status, response.headers.get("location"), self.topic.kind)
            if status != 200:
                body = await read_prefix(response) if status < 500 else b""
                code = upstream_error_code(body)
                if status in _RETRYABLE or status >= 500:
                    retry_after = parse_retry_after(response.headers.get("retry-after"),
                                                    self.config.backoff_max * 4) or 0.0
                    raise _Retry(f"http_{status if status < 500 else '5xx'}", retry_after)
                raise FeedError(f"upstream answered {status}" + (f" ({code})" if code else ""))
            self.connected.set()
            self.state = "open"
            log.info("upstream connected", extra={
                "stream_kind": self.topic.kind, "resume": b"last-event-id" in headers,
                "attempt": self.backoff.attempt})
            return await self._consume(response)

    async def _consume(self, response: httpx.Response) -> int:
        try:
            return await self._decode(response)
        except EventTooLarge:
            log.warning("upstream event too large", extra={
                "stream_kind": self.topic.kind, "limit": self.config.max_event_bytes})
            raise FeedError(f"the upstream sent an event larger than upstream.max_event_bytes "
                            f"({self.config.max_event_bytes} bytes)") from None

    async def _decode(self, response: httpx.Response) -> int:
        topic = self.topic
        decoder = SSEDecoder(self.config.max_event_bytes)
        skip = 0 if self.upstream_ids or topic.ordinal == 0 else topic.ordinal
        seen = 0
        published = 0
        async for chunk in response.aiter_bytes():
            for sse in decoder.feed(chunk):
                if decoder.retry is not None:
                    self.retry_hint = min(decoder.retry / 1000.0, self.config.backoff_max * 4)
                seen += 1
                if seen <= skip:
                    continue
                if sse.id is None or sse.id == "":
                    if topic.ordinal == 0 or not self.upstream_ids:
                        self.upstream_ids = False
                    event_id = str(topic.ordinal + 1)
                elif topic.already_has(sse.id):
                    continue
                else:
                    event_id = sse.id
                received = self.clock()
                topic.publish(Event(topic.key, event_id, sse.event, sse.data, received))
                self.metrics.upstream_events.labels(topic.kind).inc()
                published += 1
                if topic.ended:
                    return published
        if decoder.retry is not None:
            self.retry_hint = min(decoder.retry / 1000.0, self.config.backoff_max * 4)
        return published


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
