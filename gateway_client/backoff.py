"""When to reconnect: full-jitter exponential backoff, never sooner than the server asks.

A gateway that drains sends all of its clients away in the same second; full jitter
(a uniform draw over the whole window) spreads them out instead of moving the herd.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_BASE = 0.5
"""Seconds: the window of the first retry."""
DEFAULT_CAP = 30.0
"""Seconds: the largest window; also how long a connection must last to count as healthy."""
DEFAULT_MAX_ELAPSED = 300.0
"""Seconds of failing without progress after which a stream gives up."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """The reconnect policy: delay = rand() * min(cap, base * 2**attempt), at least the server's hint.

    `max_attempts` and `max_elapsed` (None: unbounded) limit consecutive failures without
    progress; `rand` returns a float in [0, 1) and is injectable for tests.
    """

    base: float = DEFAULT_BASE
    cap: float = DEFAULT_CAP
    max_attempts: int | None = None
    max_elapsed: float | None = DEFAULT_MAX_ELAPSED
    rand: Callable[[], float] = field(default=random.random, repr=False)

    def __post_init__(self) -> None:
        problems = []
        if not self.base > 0:
            problems.append("base must be > 0")
        if not self.cap >= self.base:
            problems.append("cap must be >= base")
        if self.max_attempts is not None and self.max_attempts < 0:
            problems.append("max_attempts must be >= 0")
        if self.max_elapsed is not None and not self.max_elapsed >= 0:
            problems.append("max_elapsed must be >= 0")
        if problems:
            raise ValueError("invalid backoff: " + "; ".join(problems))

    def delay(self, attempt: int, floor: float = 0.0) -> float:
        """Seconds to wait before retry number `attempt` (from 0), never less than `floor`."""
        window = min(self.cap, self.base * 2.0 ** min(attempt, 64))
        return max(floor, window * self.rand())


class Attempts:
    """Consecutive failures of one stream since it last made progress."""

    def __init__(self, policy: Backoff, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self.count = 0
        self._since: float | None = None

    def progressed(self) -> None:
        """A new event arrived (or a connection stayed healthy): the next failure starts afresh."""
        self.count = 0
        self._since = None

    def next_delay(self, floor: float = 0.0) -> float | None:
        """The delay before the next try, or None when the policy says to give up."""
        now = self.clock()
        if self._since is None:
            self._since = now
        policy = self.policy
        if policy.max_attempts is not None and self.count >= policy.max_attempts:
            return None
        if policy.max_elapsed is not None and now - self._since >= policy.max_elapsed:
            return None
        delay = policy.delay(self.count, floor)
        self.count += 1
        return delay
