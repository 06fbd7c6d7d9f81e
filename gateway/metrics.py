"""Prometheus metrics on an injected registry (never the global default one).

Labels are low-cardinality by construction: transports, stream kinds, close codes and
reasons. No evaluation id, consumer or token ever becomes a label value.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.types import Receive, Scope, Send

if TYPE_CHECKING:
    from gateway.codec.events import Event

_DELAY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class DeferredCount:
    """Increments of one counter gathered over an event-loop iteration and reported as one.

    The fan-out counts frames per subscriber write; a locked counter increment for each of
    thousands of writes would cost more than the rest of their bookkeeping.
    """

    __slots__ = ("_counter", "_pending")

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._pending = 0

    def add(self, amount: int) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._report)
        self._pending += amount

    def _report(self) -> None:
        self._counter.inc(self._pending)
        self._pending = 0


class Deliveries:
    """What one transport wrote: its frame count (`DeferredCount`) and a sample of the fan-out delay.

    Called once per topic pass for the subscribers the pass wrote to, and once per write a
    subscriber made itself. The delay (upstream receipt to write) is observed for every
    pass and for one own write in `SAMPLE_EVERY`: a histogram per write would cost more
    than the write.
    """

    SAMPLE_EVERY = 16
    __slots__ = ("_clock", "_delay", "_frames", "_writes")

    def __init__(self, frames: Counter, delay: Histogram, clock: Callable[[], float]) -> None:
        self._frames = DeferredCount(frames)
        self._delay = delay
        self._clock = clock
        self._writes = 0

    def delivered(self, writes: int, batch: Sequence[Event]) -> None:
        """`writes` subscribers were each given every event of `batch`."""
        self.count(writes * len(batch), writes, batch[-1].received_at)

    def count(self, frames: int, writes: int, received_at: float) -> None:
        self._frames.add(frames)
        before = self._writes
        self._writes += writes
        if writes > 1 or self._writes // self.SAMPLE_EVERY != before // self.SAMPLE_EVERY:
            self._delay.observe(self._clock() - received_at)


class _OldestEventAge(Collector):
    """Seconds since the last upstream event, per open stream kind (the oldest stream wins)."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, float]]], clock: Callable[[], float]) -> None:
        self._source = source
        self._clock = clock

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "gateway_upstream_last_event_age_seconds",
            "Seconds since the last upstream event, oldest open stream per kind",
            labels=["kind"],
        )
        oldest: dict[str, float] = {}
        now = self._clock()
        for kind, last in self._source():
            oldest[kind] = max(oldest.get(kind, 0.0), now - last)
        for kind, age in sorted(oldest.items()):
            family.add_metric([kind], age)
        yield family


class _BrokerState(Collector):
    """Shared mode: is Redis answering, and for how long has it not been (computed at scrape time)."""

    def __init__(self, source: Callable[[], tuple[bool, float]]) -> None:
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        up, down_for = self._source()
        yield GaugeMetricFamily("gateway_broker_up", "1 while the shared broker (Redis) answers, 0 while it does not",
                                value=1.0 if up else 0.0)
        yield GaugeMetricFamily("gateway_broker_unavailable_seconds",
                                "Seconds the shared broker (Redis) has not been answering (0 while it answers)",
                                value=down_for)


class Metrics:
    """Every metric the gateway exports; one instance per app, built on the given registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.subscribers = Gauge("gateway_subscribers", "Open browser subscriptions",
                                 ["transport", "kind"], registry=r)
        self.upstream_streams = Gauge("gateway_upstream_streams", "Open upstream streams", ["kind"], registry=r)
        self.upstream_connects = Counter("gateway_upstream_connects", "Upstream connection attempts",
                                         ["kind", "reason"], registry=r)
        self.upstream_events = Counter("gateway_upstream_events", "Events received from upstream",
                                       ["kind"], registry=r)
        self.frames_sent = Counter("gateway_frames_sent", "Event frames written to browsers",
                                   ["transport"], registry=r)
        self.fanout_delay = Histogram("gateway_fanout_delay_seconds",
                                      "Upstream receipt to write on the browser socket",
                                      buckets=_DELAY_BUCKETS, registry=r)
        self.replays = Counter("gateway_replay_requests", "Resume requests by outcome", ["outcome"], registry=r)
        self.slow_consumers = Counter("gateway_slow_consumer_disconnects",
                                      "Subscribers disconnected for falling behind", registry=r)
        self.closes = Counter("gateway_closes", "Streams ended by the gateway, by close code", ["code"], registry=r)
        self.auth_failures = Counter("gateway_auth_failures", "Rejected credentials by reason", ["reason"],
                                     registry=r)
        self.limit_rejections = Counter("gateway_limit_rejections", "Requests refused by a limit", ["limit"],
                                        registry=r)
        self.polls = Counter("gateway_poll_requests", "Polling requests from browsers", ["outcome"], registry=r)
        self.ws_messages = Counter("gateway_ws_client_messages", "WebSocket client messages by outcome",
                                   ["outcome"], registry=r)
        self.build_info = Info("gateway_build", "Gateway build information", registry=r)
        self.build_info.info({"version": __version__})
        # Redis broker (shared mode).
        self.leases_held = Gauge("gateway_leases_held", "Upstream leases this replica holds", registry=r)
        self.lease_takeovers = Counter("gateway_lease_takeovers", "Leases taken over from another replica",
                                       registry=r)
        self.redis_roundtrip = Histogram("gateway_redis_roundtrip_seconds", "Redis command round trips",
                                         buckets=_DELAY_BUCKETS, registry=r)
        self.tail_lag = Histogram("gateway_redis_tail_lag_seconds", "Redis stream append to local fan-out",
                                  buckets=_DELAY_BUCKETS, registry=r)

    def watch_broker(self, source: Callable[[], tuple[bool, float]]) -> None:
        """Register `gateway_broker_up` and `gateway_broker_unavailable_seconds` (shared mode only)."""
        self.registry.register(_BrokerState(source))

    def watch_streams(self, source: Callable[[], Iterable[tuple[str, float]]],
                      clock: Callable[[], float] = time.monotonic) -> None:
        """Register the age-of-last-event gauge, computed at scrape time from `source`."""
        self.registry.register(_OldestEventAge(source, clock))


class MetricsApp:
    """A tiny ASGI app serving `GET /metrics` from one registry: the separate `metrics.port` listener."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics":
            status, body, content_type = 404, b'{"error":{"code":"not_found","message":"not found"}}', \
                "application/json"
        elif scope["method"] not in ("GET", "HEAD"):
            status, body, content_type = 405, b'{"error":{"code":"method_not_allowed","message":"use GET"}}', \
                "application/json"
        else:
            status, body, content_type = 200, generate_latest(self.registry), CONTENT_TYPE_LATEST
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
