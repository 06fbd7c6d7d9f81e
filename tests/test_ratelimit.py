"""The token bucket behind the WebSocket client-message rate limit, on a fake clock."""

from __future__ import annotations

from gateway.limits.ratelimit import TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_steady_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5  # one token back
    assert bucket.allow() and not bucket.allow()


def test_idle_time_refills_only_up_to_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=2, clock=clock)
    assert bucket.allow() and bucket.allow() and not bucket.allow()
    clock.now += 3600
    assert [bucket.allow() for _ in range(3)] == [True, True, False]
