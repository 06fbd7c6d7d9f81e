"""Reconnect delays: full jitter in [0, min(cap, base * 2**attempt)], floors from server hints."""

from __future__ import annotations

import pytest

from gateway.upstream.backoff import Backoff, parse_retry_after


def always(value: float) -> Backoff:
    return Backoff(base=0.5, cap=30.0, rand=lambda: value)


class TestBackoff:
    def test_upper_bound_doubles_per_attempt(self) -> None:
        backoff = always(1.0)
        assert [backoff.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]

    def test_upper_bound_is_capped(self) -> None:
        backoff = always(1.0)
        delays = [backoff.next() for _ in range(12)]
        assert delays[6:] == [30.0] * 6
        assert max(delays) == 30.0

    def test_lower_bound_is_zero(self) -> None:
        backoff = always(0.0)
        assert [backoff.next() for _ in range(5)] == [0.0] * 5

    def test_jitter_scales_the_window(self) -> None:
        backoff = always(0.25)
        assert [backoff.next() for _ in range(3)] == [0.125, 0.25, 0.5]

    def test_attempt_counts_calls(self) -> None:
        backoff = always(0.5)
        for _ in range(3):
            backoff.next()
        assert backoff.attempt == 3

    def test_reset_starts_over(self) -> None:
        backoff = always(1.0)
        for _ in range(8):
            backoff.next()
        backoff.reset()
        assert backoff.attempt == 0
        assert backoff.next() == 0.5

    def test_floor_raises_the_delay(self) -> None:
        backoff = always(0.0)
        assert backoff.next(floor=7.0) == 7.0
        assert backoff.next() == 0.0  # a floor applies to one delay only

    def test_floor_below_the_draw_changes_nothing(self) -> None:
        assert always(1.0).next(floor=0.1) == 0.5

    def test_floor_may_exceed_the_cap(self) -> None:
        # The server's own Retry-After wins over our cap (callers bound it via parse_retry_after).
        assert always(1.0).next(floor=120.0) == 120.0

    def test_many_attempts_do_not_overflow(self) -> None:
        backoff = always(1.0)
        backoff.attempt = 10_000
        assert backoff.next() == 30.0

    def test_default_rand_stays_within_bounds(self) -> None:
        backoff = Backoff(base=1.0, cap=4.0)
        for attempt in range(50):
            ceiling = min(4.0, 1.0 * 2**attempt)
            assert 0.0 <= backoff.next() <= ceiling


class TestParseRetryAfter:
    @pytest.mark.parametrize(("value", "expected"), [
        ("120", 120.0), ("0", 0.0), (" 5 ", 5.0), ("1.5", 1.5),
    ])
    def test_seconds(self, value: str, expected: float) -> None:
        assert parse_retry_after(value) == expected

    @pytest.mark.parametrize("value", [None, "", "soon", "-1", "Wed, 21 Oct 2015 07:28:00 GMT"])
    def test_absent_or_unusable(self, value: str | None) -> None:
        assert parse_retry_after(value) is None

    def test_capped(self) -> None:
        assert parse_retry_after("86400") == 3600.0
        assert parse_retry_after("86400", cap=60.0) == 60.0
        assert parse_retry_after("1e400") == 3600.0  # inf

    @pytest.mark.parametrize("value", ["nan", "NaN", "-nan"])
    def test_nan_is_unusable(self, value: str) -> None:
        assert parse_retry_after(value) is None

    def test_result_feeds_backoff_floor(self) -> None:
        floor = parse_retry_after("3")
        assert floor is not None
        assert always(0.0).next(floor) == 3.0
