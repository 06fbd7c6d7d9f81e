"""The hub's fan-out logic against an in-memory broker: batching, shared bytes, bounds, resume, lifecycle."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.codec.closes import SHUTTING_DOWN, SLOW_CONSUMER, TERMINATED, UPSTREAM_FAILED, UPSTREAM_UNAVAILABLE
from gateway.codec.events import Event
from gateway.config import LimitsConfig
from gateway.hub.flush import FlushQueue
from gateway.hub.ports import StreamUnavailable
from gateway.hub.registry import Hub
from gateway.hub.subscription import MAX_EVENTS_PER_WRITE, Subscription
from gateway.hub.topic import Topic
from gateway.metrics import Metrics
from tests.servers import wait_for

KEY = "evaluations/e-1"


class FakeBroker:
    """Records what the hub asks of its feeds."""

    def __init__(self) -> None:
        self.attached: list[Topic] = []
        self.detached: list[Topic] = []

    def attach(self, topic: Topic) -> None:
        self.attached.append(topic)

    async def detach(self, topic: Topic) -> None:
        self.detached.append(topic)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def event(event_id: str | int, type: str = "update", data: str | None = None, stream: str = KEY) -> Event:
    return Event(stream, str(event_id), type, data if data is not None else f'{{"n":"{event_id}"}}', 0.0)


def publish(topic: Topic, *ids: str | int) -> list[Event]:
    events = [event(i) for i in ids]
    for e in events:
        topic.publish(e)
    return events


def ids(taken: tuple[bytes, list[Event]] | None) -> list[str]:
    assert taken is not None
    return [e.id for e in taken[1]]


def make_hub(**limits: Any) -> tuple[Hub, FakeBroker, Metrics, FakeClock]:
    broker, metrics, clock = FakeBroker(), Metrics(), FakeClock()
    return Hub(LimitsConfig(**limits), broker, metrics, clock), broker, metrics, clock


def woken(sub: Subscription) -> list[int]:
    calls: list[int] = []
    sub.wake = lambda: calls.append(1)
    return calls


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


class TestTake:
    def test_one_take_returns_every_pending_frame_joined(self) -> None:
        topic = Topic(KEY, capacity=100)
        sub = Subscription(topic, topic.position(None)[0], 0.0)
        events = publish(topic, 1, 2, 3)
        taken = sub.take()
        assert taken is not None
        chunk, got = taken
        assert chunk == b"".join(e.sse for e in events)
        assert got == events
        assert sub.cursor == 3 and sub.drained
        assert sub.take() is None

    def test_take_returns_only_what_is_new(self) -> None:
        topic = Topic(KEY, capacity=100)
        sub = Subscription(topic, 0, 0.0)
        publish(topic, 1, 2)
        assert ids(sub.take()) == ["1", "2"]
        publish(topic, 3)
        assert not sub.drained
        assert ids(sub.take()) == ["3"]
        assert sub.last_id() == "3"

    def test_nothing_published_means_nothing_to_take(self) -> None:
        topic = Topic(KEY, capacity=100)
        sub = Subscription(topic, 0, 0.0)
        assert sub.take() is None
        assert sub.last_id() is None

    def test_subscribers_at_the_same_cursor_share_the_same_bytes(self) -> None:
        topic = Topic(KEY, capacity=100)
        first, second = Subscription(topic, 0, 0.0), Subscription(topic, 0, 0.0)
        publish(topic, 1, 2)
        a, b = first.take(), second.take()
        assert a is not None and b is not None
        assert a[0] is b[0]

    def test_shared_bytes_are_rebuilt_after_a_publish(self) -> None:
        topic = Topic(KEY, capacity=100)
        first, second = Subscription(topic, 0, 0.0), Subscription(topic, 0, 0.0)
        publish(topic, 1)
        before = first.take()
        publish(topic, 2)
        after = second.take()
        assert before is not None and after is not None
        assert ids(after) == ["1", "2"]
        assert after[0] == before[0] + event(2).sse

    def test_subscribers_at_different_cursors_get_their_own_slice(self) -> None:
        topic = Topic(KEY, capacity=100)
        events = publish(topic, 1, 2, 3)
        late = Subscription(topic, 2, 0.0)
        early = Subscription(topic, 0, 0.0)
        assert late.take() == (events[2].sse, events[2:])
        assert ids(early.take()) == ["1", "2", "3"]

    def test_one_write_carries_at_most_max_events(self) -> None:
        topic = Topic(KEY, capacity=2 * MAX_EVENTS_PER_WRITE)
        sub = Subscription(topic, 0, 0.0)
        publish(topic, *range(MAX_EVENTS_PER_WRITE + 10))
        assert len(ids(sub.take())) == MAX_EVENTS_PER_WRITE
        assert len(ids(sub.take())) == 10

    def test_one_write_is_bounded_in_bytes_but_always_carries_one_event(self) -> None:
        topic = Topic(KEY, capacity=100, chunk_bytes=1024)
        sub = Subscription(topic, 0, 0.0)
        big = [event(i, data="x" * 600) for i in range(3)]
        huge = event(3, data="y" * 5000)
        for e in [*big, huge]:
            topic.publish(e)
        taken = [sub.take() for _ in range(4)]
        assert [ids(t) for t in taken] == [["0"], ["1"], ["2"], ["3"]]
        assert all(len(t[0]) <= 1024 for t in taken[:3] if t is not None)
        assert sub.take() is None


class TestReplayBuffer:
    def test_log_is_trimmed_to_capacity_with_slack(self) -> None:
        topic = Topic(KEY, capacity=4)
        publish(topic, 1, 2, 3, 4, 5)
        assert (topic.base, len(topic.events)) == (0, 5)  # within capacity + capacity // 4
        publish(topic, 6)
        assert topic.base == 2
        assert [e.id for e in topic.events] == ["3", "4", "5", "6"]
        assert not topic.has_id("1") and topic.has_id("3")
        assert not topic.from_origin

    def test_lagging_subscriber_is_closed_as_slow_consumer(self) -> None:
        topic = Topic(KEY, capacity=4)
        lagging = Subscription(topic, 0, 0.0)
        calls = woken(lagging)
        publish(topic, 1, 2, 3, 4, 5, 6)
        assert lagging.take() is None
        assert lagging.closed and lagging.close_reason is SLOW_CONSUMER
        assert lagging.close_reason.reconnect
        assert calls

    def test_subscriber_within_the_log_is_not_closed(self) -> None:
        topic = Topic(KEY, capacity=4)
        keeping_up = Subscription(topic, 0, 0.0)
        publish(topic, 1, 2)
        assert ids(keeping_up.take()) == ["1", "2"]
        publish(topic, 3, 4, 5, 6)
        assert ids(keeping_up.take()) == ["3", "4", "5", "6"]
        assert not keeping_up.closed

    async def test_hub_applies_replay_buffer(self) -> None:
        hub, _, _, _ = make_hub(replay_buffer=4)
        lagging = hub.subscribe(KEY)
        publish(hub.topics[KEY], *range(1, 7))
        assert lagging.take() is None
        assert lagging.close_reason is SLOW_CONSUMER


class TestResume:
    def test_no_id_starts_at_the_oldest_event(self) -> None:
        topic = Topic(KEY, capacity=100)
        publish(topic, 1, 2)
        assert topic.position(None) == (0, None, False)

    async def test_known_id_resumes_right_after_it(self) -> None:
        hub, _, metrics, _ = make_hub()
        publish(hub.subscribe(KEY).topic, 1, 2, 3, 4)
        sub = hub.subscribe(KEY, after_id="2")
        assert (sub.continuity_lost, sub.pending) == (None, False)
        assert ids(sub.take()) == ["3", "4"]
        assert sample(metrics, "gateway_replay_requests_total", outcome="hit") == 1

    async def test_resume_after_the_newest_event_waits_for_the_next(self) -> None:
        hub, _, _, _ = make_hub()
        topic = hub.subscribe(KEY).topic
        publish(topic, 1, 2)
        sub = hub.subscribe(KEY, after_id="2")
        assert sub.take() is None and sub.drained
        publish(topic, 3)
        assert ids(sub.take()) == ["3"]

    async def test_unknown_id_from_origin_is_pending_until_published(self) -> None:
        hub, _, metrics, _ = make_hub()
        topic = hub.subscribe(KEY).topic
        publish(topic, "a", "b")
        sub = hub.subscribe(KEY, after_id="d")
        calls = woken(sub)
        assert sub.pending and sub in topic.pending
        assert sub.take() is None and not sub.drained
        publish(topic, "c")
        assert sub.pending and sub.take() is None
        publish(topic, "d")
        assert not sub.pending and sub.continuity_lost is None
        assert sub.take() is None  # nothing after "d" yet
        publish(topic, "e", "f")
        assert ids(sub.take()) == ["e", "f"]
        await wait_for(lambda: bool(calls), timeout=2, message="wake-up")
        assert sample(metrics, "gateway_replay_requests_total", outcome="pending") == 1

    async def test_pending_numeric_id_passed_loses_continuity(self) -> None:
        hub, _, _, _ = make_hub()
        topic = hub.subscribe(KEY).topic
        publish(topic, 1, 2)
        sub = hub.subscribe(KEY, after_id="5")
        assert sub.pending
        publish(topic, 3, 4)
        assert sub.pending
        publish(topic, 7)  # 5 was skipped: the stream went past it
        assert not sub.pending and sub.continuity_lost == "unknown"
        assert ids(sub.take()) == ["1", "2", "3", "4", "7"]

    async def test_pending_numeric_id_is_compared_as_a_number(self) -> None:
        hub, _, _, _ = make_hub()
        topic = hub.subscribe(KEY).topic
        sub = hub.subscribe(KEY, after_id="10")
        publish(topic, 9)  # "9" > "10" as text, not as a number
        assert sub.pending
        publish(topic, 10)
        assert not sub.pending and sub.continuity_lost is None

    async def test_trimmed_numeric_id_is_reported_as_trimmed(self) -> None:
        hub, _, metrics, _ = make_hub(replay_buffer=4)
        topic = hub.subscribe(KEY).topic
        publish(topic, *range(1, 7))
        sub = hub.subscribe(KEY, after_id="1")
        assert (sub.continuity_lost, sub.pending) == ("trimmed", False)
        assert ids(sub.take()) == ["3", "4", "5", "6"]
        assert sample(metrics, "gateway_replay_requests_total", outcome="continuity_lost") == 1

    def test_unknown_ids_once_the_origin_is_gone(self) -> None:
        topic = Topic(KEY, capacity=4)
        publish(topic, *range(1, 7))
        assert topic.position("abc") == (2, "unknown", False)
        assert topic.position("3") == (3, None, False)

    async def test_a_numeric_id_ahead_of_a_trimmed_log_waits_for_it(self) -> None:
        """A replica that lags the one the client came from: the id will come (or be passed)."""
        hub, _, _, _ = make_hub(replay_buffer=4)
        topic = hub.subscribe(KEY).topic
        publish(topic, *range(1, 7))
        sub = hub.subscribe(KEY, after_id="8")
        assert sub.pending and sub.take() is None
        publish(topic, 7, 8)
        assert not sub.pending and sub.continuity_lost is None and sub.take() is None
        publish(topic, 9)
        assert ids(sub.take()) == ["9"]
        passed = hub.subscribe(KEY, after_id="12")
        publish(topic, 13)  # 12 never came: the history follows the signal
        assert passed.continuity_lost == "unknown" and ids(passed.take())[-1] == "13"

    def test_unknown_id_on_an_ended_topic_is_not_pending(self) -> None:
        topic = Topic(KEY, capacity=100)
        publish(topic, 1)
        topic.publish(event(2, type="final"))
        assert topic.position("x") == (0, "unknown", False)

    async def test_unsubscribing_a_pending_subscriber_forgets_it(self) -> None:
        hub, _, _, _ = make_hub(linger=60)
        keep = hub.subscribe(KEY)
        sub = hub.subscribe(KEY, after_id="x")
        hub.unsubscribe(sub)
        assert sub not in keep.topic.pending and sub.closed


class TestEnd:
    async def test_terminal_event_ends_the_topic(self) -> None:
        hub, _, _, _ = make_hub()
        sub = hub.subscribe(KEY)
        topic = sub.topic
        ended: list[Topic] = []
        topic.on_ended = ended.append
        publish(topic, 1)
        topic.publish(event(2, type="final"))
        assert topic.ended and ended == [topic]
        publish(topic, 3)  # ignored: nothing comes after the end
        assert ids(sub.take()) == ["1", "2"]
        assert topic.end_reason is None

    @pytest.mark.parametrize("kind", ["final", "error", "job_complete", "job_failed", "job_cancelled"])
    def test_every_terminal_event_type(self, kind: str) -> None:
        topic = Topic(KEY, capacity=10)
        topic.publish(event(1, type=kind))
        assert topic.ended

    def test_non_terminal_event_does_not_end(self) -> None:
        topic = Topic(KEY, capacity=10)
        topic.publish(event(1, type="progress"))
        assert not topic.ended

    async def test_end_resolves_pending_subscribers_with_continuity_lost(self) -> None:
        hub, _, _, _ = make_hub()
        live = hub.subscribe(KEY)
        topic = live.topic
        publish(topic, 1, 2)
        pending = hub.subscribe(KEY, after_id="zzz")
        calls = woken(live)
        topic.end(UPSTREAM_FAILED, "upstream answered 404")
        assert topic.ended
        assert (topic.end_reason, topic.end_detail) == (UPSTREAM_FAILED, "upstream answered 404")
        assert not pending.pending and pending.continuity_lost == "unknown"
        assert topic.pending == []
        assert ids(pending.take()) == ["1", "2"]
        assert calls

    def test_first_end_reason_wins(self) -> None:
        topic = Topic(KEY, capacity=10)
        topic.end(UPSTREAM_FAILED, "first")
        topic.end(SHUTTING_DOWN, "second")
        topic.end()
        assert (topic.end_reason, topic.end_detail) == (UPSTREAM_FAILED, "first")


class TestHubTopics:
    async def test_one_topic_and_one_attach_per_key(self) -> None:
        hub, broker, metrics, _ = make_hub()
        subs = [hub.subscribe(KEY, consumer=f"user-{i}") for i in range(5)]
        assert len(hub.topics) == 1
        assert broker.attached == [hub.topics[KEY]]
        assert all(s.topic is hub.topics[KEY] for s in subs)
        assert hub.topics[KEY].subscribers == set(subs)
        hub.subscribe("optimizations/job-1")
        assert [t.key for t in broker.attached] == [KEY, "optimizations/job-1"]
        assert sample(metrics, "gateway_upstream_streams", kind="evaluations") == 1
        assert sample(metrics, "gateway_upstream_streams", kind="optimizations") == 1

    async def test_topic_names_kind_and_id(self) -> None:
        hub, _, _, _ = make_hub()
        topic = hub.subscribe("trace-evaluations/t-9").topic
        assert (topic.kind, topic.resource_id) == ("trace-evaluations", "t-9")

    async def test_stream_cap(self) -> None:
        hub, broker, _, _ = make_hub(max_streams=1)
        hub.subscribe(KEY)
        hub.subscribe(KEY)  # joining an open stream is always fine
        with pytest.raises(StreamUnavailable):
            hub.subscribe("evaluations/e-2")
        assert len(broker.attached) == 1

    async def test_publishes_in_one_loop_iteration_wake_each_subscriber_once(self) -> None:
        hub, _, _, _ = make_hub()
        first, second = hub.subscribe(KEY), hub.subscribe(KEY)
        other = hub.subscribe("evaluations/e-2")
        calls = [woken(first), woken(second), woken(other)]
        publish(hub.topics[KEY], 1, 2, 3)
        assert [len(c) for c in calls] == [0, 0, 0]  # deferred to the loop's flush pass
        await wait_for(lambda: bool(calls[0]), timeout=2, message="wake-up")
        assert [len(c) for c in calls] == [1, 1, 0]
        assert ids(first.take()) == ["1", "2", "3"]
        publish(hub.topics[KEY], 4)
        await wait_for(lambda: len(calls[0]) == 2, timeout=2, message="second wake-up")
        assert [len(c) for c in calls] == [2, 2, 0]

    def test_a_topic_without_a_flush_queue_wakes_on_every_publish(self) -> None:
        topic = Topic(KEY, capacity=10)
        sub = Subscription(topic, 0, 0.0)
        topic.subscribers.add(sub)
        calls = woken(sub)
        publish(topic, 1, 2)
        assert len(calls) == 2

    async def test_a_failing_flush_item_does_not_starve_the_others(self) -> None:
        queue = FlushQueue()
        done: list[str] = []

        class Item:
            def __init__(self, name: str, fail: bool = False) -> None:
                self.name, self.fail = name, fail

            def flush(self) -> None:
                if self.fail:
                    raise RuntimeError("boom")
                done.append(self.name)
                if self.name == "a":
                    queue.add(Item("queued-during-the-pass"))

        for item in (Item("a"), Item("broken", fail=True), Item("b")):
            queue.add(item)
        await wait_for(lambda: len(done) == 3, timeout=2, message="flush pass")
        assert done == ["a", "b", "queued-during-the-pass"]
        queue.add(Item("later"))
        await wait_for(lambda: "later" in done, timeout=2, message="next pass")

    async def test_publish_and_subscription_clock(self) -> None:
        hub, _, _, clock = make_hub()
        sub = hub.subscribe(KEY)
        assert sub.last_delivery == clock.now
        clock.now += 5
        publish(sub.topic, 1)
        assert sub.topic.last_event_at == clock.now

    async def test_close_all(self) -> None:
        hub, _, _, _ = make_hub()
        subs = [hub.subscribe(KEY), hub.subscribe(KEY), hub.subscribe("optimizations/job-1")]
        calls = [woken(s) for s in subs]
        assert hub.close_all() == 3
        assert all(s.closed and s.close_reason is SHUTTING_DOWN for s in subs)
        assert all(calls)
        with pytest.raises(StreamUnavailable):
            hub.subscribe("evaluations/new")

    async def test_terminate_ends_every_subscriber_and_the_feed_and_forgets_the_stream(self) -> None:
        hub, broker, metrics, _ = make_hub()
        reading = hub.subscribe(KEY, consumer="alice")
        waiting = hub.subscribe(KEY, after_id="9", consumer="bob")  # a resume still waiting for its id
        other = hub.subscribe("evaluations/e-2")
        topic = reading.topic
        publish(topic, 1, 2)
        calls = [woken(reading), woken(waiting), woken(other)]
        assert hub.terminate(KEY) == 2
        assert [s.close_reason for s in (reading, waiting)] == [TERMINATED, TERMINATED]
        assert all(calls[:2]) and not calls[2] and not other.closed
        assert waiting.continuity_lost is None and topic.pending == []  # a goodbye, not a history
        assert topic.ended and topic.end_reason is TERMINATED
        assert KEY not in hub.topics and topic not in hub._ended
        await wait_for(lambda: broker.detached == [topic], timeout=2, message="the feed's detach")
        assert sample(metrics, "gateway_upstream_streams", kind="evaluations") == 1  # e-2 only
        hub.unsubscribe(reading)
        hub.unsubscribe(waiting)
        # The next subscriber gets a fresh stream (a new upstream attempt), not the operator's ending.
        fresh = hub.subscribe(KEY)
        assert fresh.topic is not topic and not fresh.topic.ended and fresh.topic.head == 0
        assert broker.attached[-1] is fresh.topic
        assert hub.terminate("evaluations/not-here") is None

    def test_close_keeps_the_first_reason(self) -> None:
        sub = Subscription(Topic(KEY, capacity=10), 0, 0.0)
        sub.close(SLOW_CONSUMER)
        sub.close(SHUTTING_DOWN)
        assert sub.close_reason is SLOW_CONSUMER

    async def test_tick_wakes_everyone(self) -> None:
        hub, _, _, _ = make_hub()
        calls = [woken(hub.subscribe(KEY)), woken(hub.subscribe("evaluations/e-2"))]
        hub.tick()
        assert [len(c) for c in calls] == [1, 1]

    async def test_sweep_aborts_subscribers_stuck_in_a_write(self) -> None:
        hub, _, _, clock = make_hub(send_timeout=30)
        stuck, sending, idle = hub.subscribe(KEY), hub.subscribe(KEY), hub.subscribe(KEY)
        aborted: list[Subscription] = []
        for sub in (stuck, sending, idle):
            sub.abort = lambda sub=sub: aborted.append(sub)
        stuck.sending_since = clock.now
        clock.now += 20
        sending.sending_since = clock.now
        clock.now += 11
        hub.sweep()
        assert aborted == [stuck]
        assert stuck.close_reason is SLOW_CONSUMER
        assert not sending.closed and not idle.closed


class TestLinger:
    async def test_last_unsubscribe_detaches_after_linger(self) -> None:
        hub, broker, metrics, _ = make_hub(linger=0.01)
        first, second = hub.subscribe(KEY), hub.subscribe(KEY)
        topic = first.topic
        hub.unsubscribe(first)
        assert topic.linger_handle is None  # someone is still watching
        hub.unsubscribe(second)
        assert topic.linger_handle is not None
        await wait_for(lambda: broker.detached == [topic], timeout=2, message="detach")
        assert KEY not in hub.topics
        assert sample(metrics, "gateway_upstream_streams", kind="evaluations") == 0

    async def test_resubscribing_within_linger_keeps_the_topic(self) -> None:
        hub, broker, _, _ = make_hub(linger=60)
        sub = hub.subscribe(KEY)
        topic = sub.topic
        hub.unsubscribe(sub)
        handle = topic.linger_handle
        assert handle is not None
        again = hub.subscribe(KEY)
        assert again.topic is topic and topic.linger_handle is None
        assert handle.cancelled()
        assert broker.attached == [topic]

    async def test_new_topic_after_detach(self) -> None:
        hub, broker, _, _ = make_hub(linger=0.01)
        hub.unsubscribe(hub.subscribe(KEY))
        await wait_for(lambda: len(broker.detached) == 1, timeout=2, message="detach")
        fresh = hub.subscribe(KEY).topic
        assert fresh is not broker.detached[0]
        assert broker.attached == [broker.detached[0], fresh]

    async def test_ended_topic_is_kept_for_history_ttl_not_linger(self) -> None:
        hub, broker, _, _ = make_hub(linger=60, history_ttl=0.01)
        sub = hub.subscribe(KEY)
        sub.topic.publish(event(1, type="final"))
        hub.unsubscribe(sub)
        await wait_for(lambda: broker.detached == [sub.topic], timeout=2, message="detach")

    async def test_aclose_detaches_every_topic(self) -> None:
        hub, broker, _, _ = make_hub(linger=60)
        hub.subscribe(KEY)
        lingering = hub.subscribe("evaluations/e-2")
        hub.unsubscribe(lingering)
        await hub.aclose()
        assert {t.key for t in broker.detached} == {KEY, "evaluations/e-2"}
        assert hub.topics == {}


class Socket:
    """A `DirectOutput` that records writes and can report itself full after a number of them."""

    def __init__(self, room: int = 1 << 30) -> None:
        self.writes: list[bytes] = []
        self.room = room

    @property
    def paused(self) -> bool:
        return len(self.writes) >= self.room

    def write(self, data: bytes) -> None:
        self.writes.append(data)


class Tally:
    def __init__(self) -> None:
        self.calls: list[tuple[int, list[str]]] = []

    def delivered(self, writes: int, batch: list[Event]) -> None:
        self.calls.append((writes, [e.id for e in batch]))


def direct(sub: Subscription, tally: Tally, room: int = 1 << 30) -> tuple[Socket, list[int]]:
    socket = Socket(room)
    sub.direct, sub.tally = socket, tally
    return socket, woken(sub)


async def one_pass(hub: Hub) -> None:
    """Let the flush pass queued by the publishes run (it is the next loop callback)."""
    passed: list[int] = []
    hub.flushes.add(type("Marker", (), {"flush": lambda self: passed.append(1)})())
    await wait_for(lambda: bool(passed), timeout=2, message="flush pass")


class TestDirectPass:
    async def test_caught_up_subscribers_get_the_same_bytes_from_the_topic_pass(self) -> None:
        hub, _, _, clock = make_hub()
        tally = Tally()
        subs = [hub.subscribe(KEY) for _ in range(3)]
        outputs = [direct(sub, tally) for sub in subs]
        clock.now += 7
        events = publish(subs[0].topic, 1, 2)
        await one_pass(hub)
        chunk = b"".join(e.sse for e in events)
        for sub, (socket, calls) in zip(subs, outputs, strict=True):
            assert socket.writes == [chunk] and calls == []  # written by the pass, not woken
            assert socket.writes[0] is outputs[0][0].writes[0]  # one joined object for all
            assert sub.drained and sub.last_delivery == sub.last_write == clock.now
            assert (sub.sent_events, sub.sent_bytes) == (2, len(chunk))
        assert tally.calls == [(3, ["1", "2"])]  # counted once per pass
        publish(subs[0].topic, 3)
        await one_pass(hub)
        assert [len(socket.writes) for socket, _ in outputs] == [2, 2, 2]

    async def test_anyone_with_something_else_due_is_woken_instead(self) -> None:
        hub, _, _, _ = make_hub()
        tally = Tally()
        ready, full, closing, told, plain = (hub.subscribe(KEY) for _ in range(5))
        topic = ready.topic
        outputs = {name: direct(sub, tally, room=0 if name == "full" else 1 << 30)
                   for name, sub in (("ready", ready), ("full", full), ("closing", closing), ("told", told))}
        plain_calls = woken(plain)  # no direct output (a WebSocket subscription)
        closing.close(SHUTTING_DOWN)
        told.continuity_lost = "trimmed"
        for _, calls in outputs.values():
            calls.clear()
        publish(topic, 1)
        await one_pass(hub)
        assert outputs["ready"][0].writes and not outputs["ready"][1]
        for name in ("full", "closing", "told"):
            socket, calls = outputs[name]
            assert socket.writes == [] and calls == [1], name
        assert plain_calls == [1]
        assert full.cursor == closing.cursor == told.cursor == 0  # left for their own flush
        assert tally.calls == [(1, ["1"])]

    async def test_a_pending_or_lagging_subscriber_is_woken(self) -> None:
        hub, _, _, _ = make_hub()
        tally = Tally()
        early = hub.subscribe(KEY)
        topic = early.topic
        publish(topic, 1)
        await one_pass(hub)
        lagging = hub.subscribe(KEY)  # joins at the start of the log: behind the pass's position
        resuming = hub.subscribe(KEY, after_id="nope")
        assert resuming.pending
        early_out, _ = direct(early, tally)
        (lag_out, lag_calls), (res_out, res_calls) = direct(lagging, tally), direct(resuming, tally)
        early.cursor = topic.head
        publish(topic, 2)
        await one_pass(hub)
        assert early_out.writes == [topic.events[1].sse]
        assert lag_out.writes == res_out.writes == [] and lag_calls == res_calls == [1]

    async def test_a_socket_that_fills_up_is_marked_as_sending(self) -> None:
        hub, _, _, clock = make_hub()
        sub = hub.subscribe(KEY)
        socket, _ = direct(sub, Tally(), room=1)
        publish(sub.topic, 1)
        await one_pass(hub)
        assert socket.writes and sub.sending_since == clock.now

    async def test_more_than_one_write_or_the_end_wakes_everyone(self) -> None:
        hub, _, _, _ = make_hub(subscriber_buffer=1024)
        sub = hub.subscribe(KEY)
        socket, calls = direct(sub, Tally())
        for i in range(1, 6):  # ~300 bytes each: more than one 1024-byte write
            sub.topic.publish(event(i, data='"' + "x" * 280 + '"'))
        await one_pass(hub)
        assert socket.writes == [] and calls == [1]
        sub.cursor = sub.topic.head
        calls.clear()
        sub.topic.publish(event(10, type="final"))
        await one_pass(hub)
        assert sub.topic.ended and socket.writes == [] and calls == [1]  # the goodbye is the owner's

    async def test_websocket_subscribers_get_the_websocket_frames(self) -> None:
        hub, _, _, _ = make_hub()
        tally = Tally()
        sse_sub, ws_sub, other_ws = hub.subscribe(KEY), hub.subscribe(KEY), hub.subscribe(KEY)
        (sse_out, _), (ws_out, _), (other_out, _) = (direct(s, tally) for s in (sse_sub, ws_sub, other_ws))
        ws_sub.ws = other_ws.ws = True
        events = publish(sse_sub.topic, 1, 2)
        await one_pass(hub)
        assert sse_out.writes == [b"".join(e.sse for e in events)]
        assert ws_out.writes == [b"".join(e.ws_frame for e in events)]
        assert other_out.writes[0] is ws_out.writes[0]  # joined once for every WebSocket
        assert ws_sub.sent_bytes == len(ws_out.writes[0])
        assert sum(writes for writes, _ in tally.calls) == 3


class Exploding:
    """A subscriber's socket whose every write raises (a bug in one transport, say)."""

    paused = False

    def write(self, data: bytes) -> None:
        raise RuntimeError("broken socket")


class TestIsolation:
    """An exception while serving one subscriber stays with that subscriber (issue 13)."""

    async def test_a_failing_subscriber_is_cut_off_and_the_others_get_every_event(self) -> None:
        hub, _, _, _ = make_hub()
        tally = Tally()
        good = [hub.subscribe(KEY) for _ in range(3)]
        bad_write, bad_wake = hub.subscribe(KEY), hub.subscribe(KEY)
        outputs = [direct(sub, tally) for sub in good]
        bad_write.direct, bad_write.tally = Exploding(), tally
        aborted: list[str] = []
        bad_write.abort = lambda: aborted.append("write")
        bad_wake.wake = lambda: (_ for _ in ()).throw(RuntimeError("broken wake"))
        bad_wake.abort = lambda: aborted.append("wake")
        topic = good[0].topic
        publish(topic, 1, 2)  # never raises, whatever the subscribers do
        await one_pass(hub)
        publish(topic, 3)
        await one_pass(hub)
        for sub, (socket, _) in zip(good, outputs, strict=True):
            assert b"".join(socket.writes) == b"".join(e.sse for e in topic.events)
            assert not sub.closed
        assert sorted(aborted) == ["wake", "write"]
        assert bad_write.failed and bad_wake.failed and bad_write.closed and bad_wake.closed
        # Cut off for good: later passes and wake-ups never call into them again.
        topic.wake_all()
        hub.tick()
        hub.sweep()
        assert sorted(aborted) == ["wake", "write"]

    async def test_a_failing_abort_does_not_stop_the_sweep(self) -> None:
        hub, _, _, clock = make_hub(send_timeout=1)
        stuck, also_stuck = hub.subscribe(KEY), hub.subscribe(KEY)
        stuck.sending_since = also_stuck.sending_since = clock.now
        stuck.abort = lambda: (_ for _ in ()).throw(RuntimeError("broken abort"))
        aborted: list[int] = []
        also_stuck.abort = lambda: aborted.append(1)
        clock.now += 5
        hub.sweep()
        assert stuck.failed and also_stuck.close_reason is SLOW_CONSUMER and aborted == [1]

    async def test_a_superseding_claim_survives_the_older_subscribers_broken_wake(self) -> None:
        from gateway.limits.exclusive import ExclusiveStreams

        hub, _, _, _ = make_hub()
        exclusive = ExclusiveStreams(LimitsConfig())
        older, newer = hub.subscribe(KEY, consumer="alice"), hub.subscribe(KEY, consumer="alice")
        exclusive.claim("alice", KEY, older)
        older.wake = lambda: (_ for _ in ()).throw(RuntimeError("broken wake"))
        exclusive.claim("alice", KEY, newer)  # supersedes the older one without raising
        assert older.failed and not newer.closed

    @pytest.mark.parametrize("bad_id", ["\u00b2", "1\u0663", "\u00b9\u00b2\u00b3", "x" * 500, "a b", "\x00"])
    async def test_malformed_resume_ids_are_unknown_never_pending(self, bad_id: str) -> None:
        hub, _, _, _ = make_hub()
        viewer = hub.subscribe(KEY)
        socket, _ = direct(viewer, Tally())
        attacker = hub.subscribe(KEY, after_id=bad_id)
        assert not attacker.pending and attacker.continuity_lost == "unknown"
        publish(viewer.topic, 1, 2, "3")
        await one_pass(hub)
        assert len(b"".join(socket.writes).split(b"\n\n")) == 4
        assert viewer.topic.already_has("\u00b2") is False

    def test_ids_compare_by_value_only_when_ascii_decimal(self) -> None:
        topic = Topic(KEY, capacity=10)
        publish(topic, 5)
        assert topic.already_has("4") and topic.already_has("5") and not topic.already_has("6")
        assert not topic.already_has("\u0664")  # Arabic-Indic four: an opaque id, not 4
        late = Subscription(topic, 0, 0.0)
        late.resume_id = "\u0667"
        topic.pending.append(late)
        publish(topic, 9)  # must not raise
        assert late.pending


class TestSlots:
    """`limits.max_streams` counts live feeds; ended histories are bounded by bytes (issue 13)."""

    async def test_ended_streams_do_not_hold_stream_slots(self) -> None:
        hub, _, _, _ = make_hub(max_streams=2)
        first = hub.subscribe("evaluations/a")
        first.topic.end(UPSTREAM_FAILED, "upstream answered 404")
        hub.unsubscribe(first)
        assert "evaluations/a" not in hub.topics  # refused before any event: nothing kept
        done = hub.subscribe("evaluations/b")
        publish(done.topic, 1)
        done.topic.publish(event(2, type="final"))
        hub.unsubscribe(done)
        assert "evaluations/b" in hub.topics  # kept for late resumes, but not a live feed
        hub.subscribe("evaluations/c")
        hub.subscribe("evaluations/d")
        with pytest.raises(StreamUnavailable):
            hub.subscribe("evaluations/e")

    async def test_ended_histories_are_bounded_by_bytes_oldest_first(self) -> None:
        hub, _, _, _ = make_hub(ended_history_bytes=3000)
        for name in ("old", "mid", "new"):
            sub = hub.subscribe(f"evaluations/{name}")
            sub.topic.publish(event(1, data='"' + "x" * 500 + '"', stream=f"evaluations/{name}"))
            sub.topic.publish(event(2, type="final", stream=f"evaluations/{name}"))
            hub.unsubscribe(sub)
        assert "evaluations/old" not in hub.topics
        assert {"evaluations/mid", "evaluations/new"} <= set(hub.topics)
        assert hub._ended_bytes <= 3000

    async def test_a_reconnectable_ending_is_not_served_again(self) -> None:
        hub, broker, _, _ = make_hub()
        first = hub.subscribe(KEY)
        publish(first.topic, 1, 2)
        first.topic.end(UPSTREAM_UNAVAILABLE, "internal error in the upstream feed")
        newcomer = hub.subscribe(KEY, after_id="1")
        assert newcomer.topic is not first.topic and not newcomer.topic.ended
        assert [t.key for t in broker.attached] == [KEY, KEY]
        # The retry starts from the failed topic's history: the resume point still works.
        assert newcomer.cursor == 1 and newcomer.topic.last_id == "2"
        hub.unsubscribe(first)  # the old topic's subscriber leaving does not touch the new one
        assert hub.topics[KEY] is newcomer.topic
