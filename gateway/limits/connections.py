"""Open browser connections, in total, per consumer and per client address (`server.max_connections*`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.config import ServerConfig
from gateway.errors import LimitError


class ConnectionLimiter:
    """Counts open streams and refuses new ones past a cap (429 with Retry-After, 503 when full)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.total = 0
        self.per_consumer: Counter[str] = Counter()
        self.per_ip: Counter[str] = Counter()

    def check(self, consumer: str, ip: str) -> None:
        if self.total >= self.config.max_connections:
            raise LimitError("the gateway is at capacity", status=503, code="over_capacity",
                             retry_after=5, reason="max_connections")
        if self.per_consumer[consumer] >= self.config.max_connections_per_consumer:
            raise LimitError("too many open streams for this user", retry_after=10,
                             reason="max_connections_per_consumer")
        if self.per_ip[ip] >= self.config.max_connections_per_ip:
            raise LimitError("too many open streams from this address", retry_after=10,
                             reason="max_connections_per_ip")

    def acquire(self, consumer: str, ip: str) -> None:
        """Count one open connection (check first); pair with `release`."""
        self.check(consumer, ip)
        self.total += 1
        self.per_consumer[consumer] += 1
        self.per_ip[ip] += 1

    def release(self, consumer: str, ip: str) -> None:
        self.total -= 1
        self.per_consumer[consumer] -= 1
        if self.per_consumer[consumer] <= 0:
            del self.per_consumer[consumer]
        self.per_ip[ip] -= 1
        if self.per_ip[ip] <= 0:
            del self.per_ip[ip]

    @contextmanager
    def hold(self, consumer: str, ip: str) -> Iterator[None]:
        """Count one connection for the duration of the block."""
        self.acquire(consumer, ip)
        try:
            yield
        finally:
            self.release(consumer, ip)
