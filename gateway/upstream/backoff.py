"""Reconnect delays: exponential backoff with full jitter, honouring server hints."""

from __future__ import annotations

import math
import random
from collections.abc import Callable


class Backoff:
    """`next()` returns a delay drawn uniformly from [0, min(cap, base * 2**attempt)].

    Full jitter spreads many reconnecting clients over the whole window, so a restart
    of the upstream is not followed by a synchronized storm. A server's own hint
    (`retry:` or `Retry-After`) raises the floor of the next delay.
    """

    def __init__(self, base: float, cap: float, rand: Callable[[], float] = random.random) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rand = rand

    def next(self, floor: float = 0.0) -> float:
        ceiling = min(self.cap, self.base * (2.0 ** min(self.attempt, 32)))
        self.attempt += 1
        return max(floor, ceiling * self._rand())

    def reset(self) -> None:
        self.attempt = 0


def parse_retry_after(value: str | None, cap: float = 3600.0) -> float | None:
    """Seconds from a `Retry-After` header given in seconds (HTTP-dates are treated as absent)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if math.isnan(seconds) or seconds < 0:
        return None
    return min(seconds, cap)
