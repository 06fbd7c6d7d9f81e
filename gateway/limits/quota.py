"""Distinct streams per consumer (`limits.max_streams_per_consumer`)."""

from __future__ import annotations

from collections import Counter

from gateway.errors import LimitError


class StreamQuota:
    """Distinct streams each consumer holds at once, across SSE and WebSocket (`max_streams_per_consumer`).

    One token with `evaluations/*` could otherwise open streams until the gateway's whole
    `max_streams` is taken. A second subscription to a stream the consumer already holds (a
    second tab) costs nothing more.
    """

    RETRY_AFTER = 10.0

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, Counter[str]] = {}

    def check(self, consumer: str, resource: str) -> None:
        held = self._held.get(consumer)
        if held is not None and resource not in held and len(held) >= self.limit:
            raise LimitError(f"at most {self.limit} streams at once per user", status=429, code="too_many_streams",
                             retry_after=self.RETRY_AFTER, reason="max_streams_per_consumer")

    def acquire(self, consumer: str, resource: str) -> None:
        """Count one subscription (check first); pair with `release`."""
        self.check(consumer, resource)
        self._held.setdefault(consumer, Counter())[resource] += 1

    def release(self, consumer: str, resource: str) -> None:
        held = self._held.get(consumer)
        if held is None or resource not in held:
            return
        held[resource] -= 1
        if held[resource] <= 0:
            del held[resource]
            if not held:
                del self._held[consumer]

    def held(self, consumer: str) -> int:
        held = self._held.get(consumer)
        return len(held) if held else 0
