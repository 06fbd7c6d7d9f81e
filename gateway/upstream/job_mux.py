"""The optimization upstream: ONE WebSocket to `/ws/optimization`, multiplexing every watched job.

`OptimizationMux` is the optimization half of the in-process broker. The hub attaches a
topic per job; the mux keeps one upstream connection (with `X-API-Key`) while any job is
live and reconciles the upstream's subscriptions with the attached topics: `subscribe`
for a new job, `unsubscribe` once the hub detaches it (after `linger`). On a drop it
reconnects with full-jitter backoff and re-subscribes every job with `afterEventId` set to
the topic's last id, dropping anything already published, so browsers see no gap and no
duplicate. `stream_already_open` (the upstream still holds our previous socket's claim)
is retried per job with backoff; `not_found` ends the job's topic for its browsers.

Every job event becomes one `Event` whose SSE data is the upstream event object and whose
WebSocket message is `{"type":"event","stream","jobId","event"}`, both encoded once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import CloseCode

from gateway.codec.closes import UPSTREAM_FAILED, UPSTREAM_UNAVAILABLE, CloseReason
from gateway.codec.events import Event
from gateway.codec.streams import JOB_KIND, id_value
from gateway.config import UpstreamConfig
from gateway.hub.ports import FeedTarget
from gateway.metrics import Metrics
from gateway.upstream.answers import RETRYABLE_STATUS, redirect_target
from gateway.upstream.backoff import Backoff, parse_retry_after
from gateway.upstream.health import UpstreamHealth

log = logging.getLogger("gateway.upstream.ws")

KIND = JOB_KIND
CLOSE_TIMEOUT = 2.0
"""Seconds to wait for the upstream's close handshake before dropping the socket."""


class _NoRedirects(connect):
    """`websockets.connect` that never follows a redirect: the API key goes to the configured origin only."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc
_SAFE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

State = Literal["subscribing", "subscribed", "unsubscribing"]


def _null_constant(name: str) -> None:
    """`NaN`/`Infinity` in an upstream message become `null`: browsers' `JSON.parse` rejects them."""
    return None


class _Fatal(Exception):
    """The upstream refused the connection for good (401/403/404): every live job ends."""


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class OptimizationMux:
    """One upstream WebSocket for every optimization job the hub is feeding."""

    def __init__(self, config: UpstreamConfig, metrics: Metrics, clock: Callable[[], float],
                 backoff: Backoff | None = None, health: UpstreamHealth | None = None,
                 connector: Callable[..., Any] = _NoRedirects) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.health = health or UpstreamHealth(clock)
        self.url = config.ws_url
        self.backoff = backoff or Backoff(config.backoff_initial, config.backoff_max)
        self._connect = connector
        #: Attached topics by job id (ended ones stay until the hub detaches them).
        self.topics: dict[str, FeedTarget] = {}
        #: What the current connection has been told, per job, and for which topic.
        self._upstream: dict[str, tuple[State, FeedTarget]] = {}
        self._job_backoff: dict[str, Backoff] = {}
        self._retry_at: dict[str, float] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._timers: set[asyncio.TimerHandle] = set()
        self.connected = asyncio.Event()
        #: When the connection's next attempt is due (`clock`) while it backs off after a failure.
        self._reconnect_at: float | None = None

    # -- the broker side --------------------------------------------------------------------------

    def attach(self, topic: FeedTarget) -> None:
        """Start feeding a job's topic (the connection opens if it is not open)."""
        self.topics[topic.resource_id] = topic
        self._job_backoff.pop(topic.resource_id, None)
        self._retry_at.pop(topic.resource_id, None)
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="feed optimizations")

    async def detach(self, topic: FeedTarget) -> None:
        """Stop feeding `topic`; its upstream subscription is dropped on the next reconcile."""
        if self.topics.get(topic.resource_id) is topic:
            del self.topics[topic.resource_id]
            self._job_backoff.pop(topic.resource_id, None)
            self._retry_at.pop(topic.resource_id, None)
            self._changed.set()

    async def aclose(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def describe(self, topic: FeedTarget) -> dict[str, Any]:
        """One job's upstream state for the admin API: subscribing, subscribed, backing_off or ended.

        A job backs off when the upstream refused its subscription for now (`stream_already_open`)
        or when the shared connection itself is down; `connection` says which.
        """
        job_id = topic.resource_id
        now = self.clock()
        reconnect_at = self._reconnect_at if not self.connected.is_set() else None
        connection = {"state": "open" if self.connected.is_set() else
                      ("backing_off" if reconnect_at is not None else "connecting"),
                      "attempt": self.backoff.attempt,
                      "retry_in": None if reconnect_at is None else round(max(0.0, reconnect_at - now), 3)}
        entry = self._upstream.get(job_id)
        retry_at = self._retry_at.get(job_id)
        retry_in: float | None = None
        if topic.ended or self.topics.get(job_id) is not topic:
            state = "ended"
        elif entry is not None and entry[1] is topic and entry[0] != "unsubscribing":
            state = entry[0]
        elif retry_at is not None or reconnect_at is not None:
            state = "backing_off"
            retry_in = round(max(0.0, (retry_at if retry_at is not None else reconnect_at or now) - now), 3)
        else:
            state = "subscribing"
        backoff = self._job_backoff.get(job_id)
        return {"state": state, "attempt": backoff.attempt if backoff is not None else 0, "retry_in": retry_in,
                "connection": connection}

    def _live(self) -> bool:
        return any(not topic.ended for topic in self.topics.values())

    # -- the connection loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._connect_loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("optimization feed crashed")
            self._end_all(UPSTREAM_UNAVAILABLE, "internal error in the upstream feed")

    async def _connect_loop(self) -> None:
        reason = "initial"
        while self._live():
            self.metrics.upstream_connects.labels(KIND, reason).inc()
            floor = 0.0
            try:
                await self._connect_once()
                reason = "initial"  # closed because idle; a job attached meanwhile reconnects at once
                continue
            except _Fatal as exc:
                log.warning("upstream refused the optimization socket", extra={"detail": str(exc)})
                self._end_all(UPSTREAM_FAILED, str(exc))
                return
            except ConnectionClosed as exc:
                if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
                    # The message cannot be read, so not attributed to one job; resubscribing would only
                    # replay it. Every job on the socket ends, told why (not an endless retry loop).
                    log.warning("upstream message too large", extra={
                        "stream_kind": KIND, "limit": self.config.max_event_bytes})
                    self._end_all(UPSTREAM_FAILED, "the upstream sent a message larger than "
                                  f"upstream.max_event_bytes ({self.config.max_event_bytes} bytes)")
                    return
                reason = "error"
            except _Retry as exc:
                reason, floor = exc.reason, exc.retry_after
            except TimeoutError:
                reason = "timeout"
            except (OSError, InvalidHandshake):
                reason = "error"
            if reason in ("timeout", "error", "http_5xx"):
                self.health.failure(reason)
            delay = self.backoff.next(floor)
            log.info("upstream reconnect scheduled", extra={
                "stream_kind": KIND, "reason": reason, "delay": round(delay, 3), "attempt": self.backoff.attempt})
            self._reconnect_at = self.clock() + delay
            try:
                await asyncio.sleep(delay)
            finally:
                self._reconnect_at = None

    async def _connect_once(self) -> None:
        """One connection's life: returns when no job is live, raises when the connection fails."""
        try:
            ws = await self._connect(
                self.url, additional_headers={"X-API-Key": self.config.api_key or ""},
                open_timeout=self.config.connect_timeout, ping_interval=self.config.ws_ping_interval,
                ping_timeout=self.config.ws_ping_interval, close_timeout=CLOSE_TIMEOUT,
                max_size=self.config.max_event_bytes)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status < 500:
                self.health.success()
            if 300 <= status < 400:
                log.warning("upstream redirect refused", extra={
                    "stream_kind": KIND, "status": status,
                    "location_origin": redirect_target(exc.response.headers.get("Location"))})
                raise _Fatal(f"upstream answered {status} (a redirect; the gateway does not follow redirects)") \
                    from None
            if status in RETRYABLE_STATUS or status >= 500:
                retry_after = parse_retry_after(exc.response.headers.get("Retry-After"), self.config.backoff_max * 4)
                raise _Retry(f"http_{status if status < 500 else '5xx'}", retry_after or 0.0) from None
            raise _Fatal(f"upstream answered {status}") from None
        self.health.success()
        self._upstream.clear()
        self.connected.set()
        log.info("upstream connected", extra={"stream_kind": KIND, "attempt": self.backoff.attempt})
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(ws))
        writer = loop.create_task(self._reconcile(ws))
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            self.connected.clear()
            self._upstream.clear()
            with contextlib.suppress(Exception):
                await ws.close()
        failure = (writer if writer in done else reader).exception()
        if failure is not None:
            raise failure

    # -- writing: make the upstream's subscriptions match the attached topics ---------------------

    async def _reconcile(self, ws: ClientConnection) -> None:
        """Send subscribe/unsubscribe until nothing live is left; returning closes the connection."""
        while True:
            self._changed.clear()
            now = self.clock()
            for job_id, topic in list(self.topics.items()):
                if topic.ended or job_id in self._upstream or self._retry_at.get(job_id, 0.0) > now:
                    continue
                message: dict[str, Any] = {"type": "subscribe", "jobId": job_id}
                if topic.last_id is not None:
                    message["afterEventId"] = id_value(topic.last_id)
                self._upstream[job_id] = ("subscribing", topic)
                await ws.send(json.dumps(message, separators=(",", ":")))
            for job_id, (state, topic) in list(self._upstream.items()):
                if state != "unsubscribing" and self.topics.get(job_id) is not topic:
                    self._upstream[job_id] = ("unsubscribing", topic)
                    await ws.send(json.dumps({"type": "unsubscribe", "jobId": job_id}, separators=(",", ":")))
            if not self._live():
                return
            if not self._changed.is_set():
                await self._changed.wait()

    # -- reading ----------------------------------------------------------------------------------

    async def _read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                self._handle(raw if isinstance(raw, str) else raw.decode("utf-8", errors="replace"))
            except Exception:  # one bad message (or one bad topic) must not take every job down
                log.exception("upstream job message failed", extra={"stream_kind": KIND})
        raise _Retry("closed")

    def _handle(self, text: str) -> None:
        try:
            message = json.loads(text, parse_constant=_null_constant)
        except (ValueError, RecursionError):
            log.warning("upstream sent a message that is not JSON")
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        job_id = message.get("jobId")
        if kind == "event" and isinstance(job_id, str):
            self._on_event(job_id, message.get("event"))
        elif kind == "subscribed" and isinstance(job_id, str):
            self.backoff.reset()  # the connection works: the next drop starts from a short delay
            entry = self._upstream.get(job_id)
            if entry is not None and entry[0] == "subscribing":
                self._upstream[job_id] = ("subscribed", entry[1])
            self._job_backoff.pop(job_id, None)
        elif kind == "unsubscribed" and isinstance(job_id, str):
            entry = self._upstream.get(job_id)
            if entry is not None and entry[0] == "unsubscribing":
                del self._upstream[job_id]
                self._changed.set()
        elif kind == "error":
            self._on_error(job_id if isinstance(job_id, str) else None, message.get("error"))

    def _on_event(self, job_id: str, envelope: object) -> None:
        entry = self._upstream.get(job_id)
        topic = self.topics.get(job_id)
        if entry is None or entry[0] == "unsubscribing" or topic is None or entry[1] is not topic:
            return  # in flight from a subscription we already dropped
        if not isinstance(envelope, dict):
            return
        raw_id, event_type = envelope.get("id"), envelope.get("eventType")
        if isinstance(raw_id, bool) or not isinstance(raw_id, int | str) or not isinstance(event_type, str) \
                or not _SAFE.fullmatch(str(raw_id)) or not _SAFE.fullmatch(event_type):
            log.warning("upstream job event without a usable id or eventType", extra={"stream_kind": KIND})
            return
        event_id = str(raw_id)
        if topic.already_has(event_id):
            return
        data = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        topic.publish(Event(topic.key, event_id, event_type, data, self.clock()))
        self.metrics.upstream_events.labels(KIND).inc()
        if topic.ended:
            # The upstream ends a subscription silently after a terminal event.
            self._upstream.pop(job_id, None)
            self._changed.set()

    def _on_error(self, job_id: str | None, error: object) -> None:
        code = error.get("code") if isinstance(error, dict) else None
        code = code if isinstance(code, str) and _SAFE.fullmatch(code) else "unknown"
        entry = self._upstream.get(job_id) if job_id is not None else None
        if job_id is None or entry is None:
            log.warning("upstream error", extra={"stream_kind": KIND, "code": code})
            return
        del self._upstream[job_id]
        topic = entry[1]
        if self.topics.get(job_id) is not topic:
            self._changed.set()
            return
        if code == "stream_already_open":
            backoff = self._job_backoff.setdefault(job_id, Backoff(self.config.backoff_initial,
                                                                   self.config.backoff_max))
            delay = backoff.next()
            self._retry_at[job_id] = self.clock() + delay
            self._later(job_id, delay)
            log.info("upstream job subscription refused; retrying", extra={
                "stream_kind": KIND, "code": code, "delay": round(delay, 3)})
            return
        log.warning("upstream ended a job stream", extra={"stream_kind": KIND, "code": code})
        topic.end(UPSTREAM_FAILED, f"upstream answered {code}")

    def _later(self, job_id: str, delay: float) -> None:
        """Retry `job_id`'s subscription after `delay`.

        The timer itself says the retry is due: the loop's clock is not `self.clock` (uvloop's is
        libuv's, in milliseconds), so a timer may fire a hair before `_retry_at` by our clock, and
        a reconcile that compared the two would skip the job and then wait forever.
        """
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def fire() -> None:
            if timer is not None:
                self._timers.discard(timer)
            self._retry_at.pop(job_id, None)
            self._changed.set()

        timer = loop.call_later(delay, fire)
        self._timers.add(timer)

    def _end_all(self, reason: CloseReason, detail: str) -> None:
        for topic in list(self.topics.values()):
            if not topic.ended:
                topic.end(reason, detail)


