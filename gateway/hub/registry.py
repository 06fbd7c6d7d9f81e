"""The hub: topics by key, created on first subscribe and fed through the broker.

It owns the topics' lifecycle (linger after the last subscriber, history kept for late
resumes, bounded live feeds and retained bytes) and one clock for every subscriber: a
sweep for stuck writes and expired credentials, and heartbeat wake-ups.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from gateway.codec.closes import SHUTTING_DOWN, SLOW_CONSUMER, TERMINATED, CloseReason
from gateway.config import LimitsConfig
from gateway.hub.flush import FlushQueue
from gateway.hub.ports import Broker, StreamUnavailable
from gateway.hub.subscription import Subscription
from gateway.hub.topic import Topic
from gateway.metrics import Metrics

log = logging.getLogger("gateway.hub")


class Hub:
    """Topics by key, created on first subscribe and fed through the broker."""

    def __init__(self, limits: LimitsConfig, broker: Broker, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.broker = broker
        self.metrics = metrics
        self.clock = clock
        self.topics: dict[str, Topic] = {}
        #: The one deferred pass per loop iteration that every topic and stream shares.
        self.flushes = FlushQueue()
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Topics counted in `gateway_upstream_streams`: created and not yet ended or dropped. These are
        #: the live upstream feeds that `limits.max_streams` caps.
        self._feeding: set[Topic] = set()
        #: Ended topics kept for late resumes, oldest first, with the bytes they hold: bounded in
        #: total by `limits.ended_history_bytes` (and each by `limits.history_ttl`).
        self._ended: dict[Topic, int] = {}
        self._ended_bytes = 0
        metrics.watch_streams(self._open_stream_ages, clock)

    def _open_stream_ages(self) -> Iterable[tuple[str, float]]:
        for topic in list(self.topics.values()):
            if not topic.ended and topic.subscribers:
                yield topic.kind, topic.last_event_at

    def subscribe(self, key: str, after_id: str | None = None, consumer: str = "") -> Subscription:
        """Join the topic for `key`, creating it (and its single upstream) if needed."""
        topic = self.topics.get(key)
        previous: Topic | None = None
        if topic is not None and topic.ended and topic.end_reason is not None and topic.end_reason.reconnect:
            # The feed failed in a way worth retrying: a newcomer gets a fresh upstream attempt, not the
            # old ending. The old topic's subscribers still get their goodbye from it.
            previous, topic = topic, None
        if topic is None:
            if self._closing or len(self._feeding) >= self.limits.max_streams:
                raise StreamUnavailable("the gateway is at its stream limit")
            if previous is not None:
                self._retire(previous)
            topic = Topic(key, self.limits.replay_buffer, self.clock, self.limits.subscriber_buffer, self.flushes)
            if previous is not None:
                topic.adopt(previous)
            topic.on_ended = self.topic_ended
            self.topics[key] = topic
            self.metrics.upstream_streams.labels(topic.kind).inc()
            self._feeding.add(topic)
            self.broker.attach(topic)
        if topic.linger_handle is not None:
            topic.linger_handle.cancel()
            topic.linger_handle = None
        cursor, lost, pending = topic.position(after_id)
        sub = Subscription(topic, cursor, self.clock(), consumer)
        if after_id is not None:
            outcome = "continuity_lost" if lost else ("pending" if pending else "hit")
            self.metrics.replays.labels(outcome).inc()
        sub.continuity_lost = lost
        if pending:
            sub.resume_id = after_id
            topic.pending.append(sub)
        topic.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Leave; the topic's upstream lingers for `limits.linger` seconds after its last subscriber."""
        topic = sub.topic
        sub.closed = True
        topic.subscribers.discard(sub)
        if sub in topic.pending:
            topic.pending.remove(sub)
        if topic.subscribers or self.topics.get(topic.key) is not topic:
            return
        if topic.ended and topic.head == 0:
            self._drop(topic)  # refused or empty: nothing to keep for a late resume
            return
        delay = self.limits.history_ttl if topic.ended else self.limits.linger
        loop = asyncio.get_running_loop()
        topic.linger_handle = loop.call_later(delay, self._expire, topic)

    def terminate(self, key: str, reason: CloseReason = TERMINATED) -> int | None:
        """End the stream `key` now for every subscriber with `reason`, and stop its upstream feed.

        The topic leaves the registry at once, its history with it, so whoever subscribes next
        starts a fresh upstream attempt rather than being served this ending (`terminated` asks
        no browser to reconnect; one that does anyway gets a new stream). Returns how many
        subscribers were told, or None when this hub has no such stream.
        """
        topic = self.topics.get(key)
        if topic is None:
            return None
        subscribers = list(topic.subscribers)
        self._retire(topic)  # stops counting it and detaches its feed
        for sub in subscribers:
            sub.close(reason)
        topic.pending.clear()  # closed: nobody waits for a resume id any more
        topic.end(reason, "an operator ended the stream")
        return len(subscribers)

    def _expire(self, topic: Topic) -> None:
        topic.linger_handle = None
        if topic.subscribers or self.topics.get(topic.key) is not topic:
            return
        self._drop(topic)

    def _retire(self, topic: Topic) -> None:
        """Take a topic out of the registry now (its subscribers finish on it)."""
        if topic.linger_handle is not None:
            topic.linger_handle.cancel()
            topic.linger_handle = None
        if self.topics.get(topic.key) is topic:
            self._drop(topic)

    def _drop(self, topic: Topic) -> None:
        del self.topics[topic.key]
        self._stop_counting(topic)
        held = self._ended.pop(topic, None)
        if held is not None:
            self._ended_bytes -= held
        task = asyncio.get_running_loop().create_task(self.broker.detach(topic))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def topic_ended(self, topic: Topic) -> None:
        """Called by feeds when a topic ends; idle ended topics are kept `history_ttl` for late resumes.

        Its upstream slot is free at once. A topic that never had an event (the upstream refused
        it) keeps nothing; the others' histories are bounded together by `ended_history_bytes`,
        the oldest unread ones evicted first.
        """
        self._stop_counting(topic)
        if self.topics.get(topic.key) is not topic:
            return
        if topic.head == 0:
            if not topic.subscribers:
                self._retire(topic)
            return
        if topic not in self._ended:
            self._ended[topic] = topic.bytes
            self._ended_bytes += topic.bytes
            self._evict_histories()
        if not topic.subscribers and topic.linger_handle is None and self.topics.get(topic.key) is topic:
            loop = asyncio.get_running_loop()
            topic.linger_handle = loop.call_later(self.limits.history_ttl, self._expire, topic)

    def _evict_histories(self) -> None:
        while self._ended_bytes > self.limits.ended_history_bytes:
            victim = next((t for t in self._ended if not t.subscribers), None)
            if victim is None:
                return
            self._retire(victim)

    def _stop_counting(self, topic: Topic) -> None:
        # An ended topic keeps its history for late resumes, but its upstream stream is over.
        if topic in self._feeding:
            self._feeding.discard(topic)
            self.metrics.upstream_streams.labels(topic.kind).dec()

    def sweep(self) -> None:
        """Abort subscribers stuck in one write for longer than `limits.send_timeout`.

        One pass a second for every subscriber is cheaper than a timer each (a timer costs
        more memory than the rest of an idle subscriber).
        """
        now = self.clock()
        timeout = self.limits.send_timeout
        for topic in list(self.topics.values()):
            for sub in list(topic.subscribers):
                if sub.sending_since and now - sub.sending_since > timeout:
                    sub.close(SLOW_CONSUMER)
                    try:
                        sub.abort()
                    except Exception:
                        sub.fail("abort")

    def tick(self) -> None:
        """Wake every subscriber so idle ones send a heartbeat or notice the inactivity limit."""
        for topic in list(self.topics.values()):
            topic.wake_all()

    async def run_ticker(self) -> None:
        """One clock for every subscriber: a sweep each second, a heartbeat wake-up each `heartbeat`."""
        interval = min(self.limits.heartbeat, 1.0)
        next_beat = self.clock() + self.limits.heartbeat
        while True:
            await asyncio.sleep(interval)
            try:
                self.sweep()
                if self.clock() >= next_beat:
                    next_beat = self.clock() + self.limits.heartbeat
                    self.tick()
            except Exception:  # pragma: no cover - a bug here must not stop heartbeats
                log.exception("hub tick failed")

    def close_all(self, reason: CloseReason = SHUTTING_DOWN) -> int:
        """End every subscription (start of a drain); returns how many were told."""
        self._closing = True
        count = 0
        for topic in list(self.topics.values()):
            for sub in list(topic.subscribers):
                sub.close(reason)
                count += 1
        return count

    async def aclose(self) -> None:
        """Stop every feed (after the drain)."""
        self._closing = True
        for topic in list(self.topics.values()):
            if topic.linger_handle is not None:
                topic.linger_handle.cancel()
            self._drop(topic)
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._tasks, return_exceptions=True)
