"""The ending policy both transports share, and the one clock for token expiry (pure, fake clocks)."""

from __future__ import annotations

import asyncio

from gateway.codec.closes import INACTIVITY_TIMEOUT, SUPERSEDED, UPSTREAM_FAILED
from gateway.codec.events import Event
from gateway.hub.subscription import Subscription
from gateway.hub.topic import Topic
from gateway.transports.ending import Expiries, continuity_notice, ending
from tests.servers import wait_for


def topic(key: str = "evaluations/e1") -> Topic:
    return Topic(key, capacity=100)


def publish(t: Topic, *ids: str, type: str = "update") -> None:
    for i in ids:
        t.publish(Event(t.key, i, type, "{}", 0.0))


class TestEnding:
    def test_a_live_caught_up_subscription_goes_on(self) -> None:
        t = topic()
        sub = Subscription(t, 0, now=100.0)
        assert ending(sub, now=150.0, inactivity_timeout=60) is None

    def test_inactivity_closes_with_a_poll_hint_for_pollable_streams(self) -> None:
        t = topic()
        publish(t, "1")
        sub = Subscription(t, 1, now=100.0)
        end = ending(sub, now=160.0, inactivity_timeout=60)
        assert end is not None and end.reason is INACTIVITY_TIMEOUT
        assert end.poll == "/api/v1/evaluations/e1" and end.last_event_id == "1"
        assert sub.closed and sub.close_reason is INACTIVITY_TIMEOUT

    def test_jobs_get_no_poll_hint_and_a_paused_job_never_times_out(self) -> None:
        job = topic("optimizations/j1")
        publish(job, "1", type="job_paused")
        sub = Subscription(job, 1, now=0.0)
        assert ending(sub, now=1e9, inactivity_timeout=60) is None
        publish(job, "2", type="job_resumed")
        sub.cursor = job.head
        end = ending(sub, now=1e9, inactivity_timeout=60)
        assert end is not None and end.reason is INACTIVITY_TIMEOUT and end.poll is None

    def test_a_stream_that_ended_ends_its_subscribers_once_they_read_everything(self) -> None:
        t = topic()
        publish(t, "1", "2")
        t.end(UPSTREAM_FAILED, "upstream answered 404")
        sub = Subscription(t, 0, now=0.0)
        assert ending(sub, now=0.0, inactivity_timeout=60) is None  # two events still to read
        sub.cursor = t.head
        end = ending(sub, now=0.0, inactivity_timeout=60)
        assert end is not None and (end.reason, end.detail, end.last_event_id) == (
            UPSTREAM_FAILED, "upstream answered 404", "2")
        assert not sub.closed

    def test_a_closed_subscription_ends_with_its_reason_or_none(self) -> None:
        t = topic()
        gone, superseded = Subscription(t, 0, 0.0), Subscription(t, 0, 0.0)
        gone.close(None)
        superseded.close(SUPERSEDED)
        assert ending(gone, 0.0, 60) is not None and ending(gone, 0.0, 60).reason is None  # type: ignore[union-attr]
        end = ending(superseded, 0.0, 60)
        assert end is not None and end.reason is SUPERSEDED and end.poll is None

    def test_continuity_is_told_once_with_the_oldest_retained_id(self) -> None:
        t = topic()
        publish(t, "5", "6")
        sub = Subscription(t, 0, 0.0)
        sub.continuity_lost = "trimmed"
        assert continuity_notice(sub) == ("trimmed", "5")
        assert continuity_notice(sub) is None


class FakeClocks:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 5000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall


class TestExpiries:
    async def test_callbacks_run_once_their_deadline_passes_in_order(self) -> None:
        expiries = Expiries()
        loop = asyncio.get_running_loop()
        now = expiries.wall_clock()
        fired: list[str] = []
        expiries.schedule(now + 0.05, lambda: fired.append("b"))
        expiries.schedule(now + 0.01, lambda: fired.append("a"))
        later = expiries.schedule(now + 3600, lambda: fired.append("never"))
        await wait_for(lambda: fired == ["a", "b"], timeout=2, message="both expiries")
        assert len(expiries) == 1 and later.callback is not None
        expiries.close()
        assert loop.is_running()

    async def test_cancelled_and_moved_deadlines(self) -> None:
        expiries = Expiries()
        now = expiries.wall_clock()
        fired: list[str] = []
        cancelled = expiries.schedule(now + 0.01, lambda: fired.append("cancelled"))
        moved = expiries.schedule(now + 0.01, lambda: fired.append("moved"))
        cancelled.cancel()
        moved.move(now + 0.1)
        await asyncio.sleep(0.05)  # well past the first deadline: nothing may have fired
        assert fired == []
        await wait_for(lambda: fired == ["moved"], timeout=2, message="the moved expiry")
        expiries.close()

    async def test_an_expiry_already_past_fires_at_once_and_a_failing_callback_hurts_nobody(self) -> None:
        expiries = Expiries()
        fired: list[int] = []

        def broken() -> None:
            raise RuntimeError("one owner's bug")

        expiries.schedule(0.0, broken)
        expiries.schedule(0.0, lambda: fired.append(1))
        await wait_for(lambda: fired == [1], timeout=2, message="the healthy callback")
        expiries.close()

    async def test_churn_does_not_grow_the_heap(self) -> None:
        clocks = FakeClocks()
        expiries = Expiries(clock=clocks.monotonic, wall_clock=clocks.time)
        for _ in range(10_000):
            expiries.schedule(clocks.wall + 3600, lambda: None).cancel()
        assert len(expiries._heap) <= 200
        keep = [expiries.schedule(clocks.wall + 3600, lambda: None) for _ in range(100)]
        assert len(expiries) == 100 and all(k.callback is not None for k in keep)
        expiries.close()
