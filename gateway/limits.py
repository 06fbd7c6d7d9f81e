"""Limits the gateway enforces towards browsers.

`ConnectionLimiter` caps open streams in total, per consumer and per client address.
`ExclusiveStreams` mirrors the upstream's one-stream-per-resource-per-consumer rule
across SSE and WebSocket: with `replace` the older stream is closed as `superseded`
(a refreshed tab is never locked out); with `reject` the newcomer gets 409.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

from gateway.closes import SUPERSEDED
from gateway.config import LimitsConfig, ServerConfig
from gateway.errors import LimitError
from gateway.hub import Subscription


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


class ClusterExclusive(Protocol):
    """The cluster-wide half of the one-stream rule (the Redis broker provides it)."""

    async def acquire(self, consumer: str, resource: str, sub: Subscription) -> None: ...

    async def release(self, consumer: str, resource: str, sub: Subscription) -> None: ...


class ExclusiveStreams:
    """One open stream per (consumer, resource), across transports (and replicas, with a cluster)."""

    def __init__(self, limits: LimitsConfig, cluster: ClusterExclusive | None = None) -> None:
        self.policy = limits.one_stream_per_consumer
        self._open: dict[tuple[str, str], Subscription] = {}
        self.cluster = cluster
        self._tasks: set[asyncio.Task[None]] = set()

    async def acquire(self, consumer: str, resource: str, sub: Subscription) -> None:
        """Check, take the cluster-wide claim (if any), then claim locally; raises LimitError (409)."""
        self.check(consumer, resource)
        if self.cluster is not None:
            await self.cluster.acquire(consumer, resource, sub)
        self.claim(consumer, resource, sub)

    def leave(self, consumer: str, resource: str, sub: Subscription) -> None:
        """Release the local claim now and the cluster-wide one in the background."""
        self.release(consumer, resource, sub)
        if self.cluster is not None:
            task = asyncio.get_running_loop().create_task(self.cluster.release(consumer, resource, sub))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def check(self, consumer: str, resource: str) -> None:
        """Refuse early (before any work) under the `reject` policy."""
        current = self._open.get((consumer, resource))
        if self.policy == "reject" and current is not None and not current.closed:
            raise LimitError(f"a stream for {resource} is already open for this user", status=409,
                             code="stream_already_open", reason="one_stream_per_consumer")

    def claim(self, consumer: str, resource: str, sub: Subscription) -> None:
        """Make `sub` the consumer's stream for `resource`, superseding an older one."""
        self.check(consumer, resource)
        previous = self._open.get((consumer, resource))
        self._open[(consumer, resource)] = sub
        if previous is not None and previous is not sub and not previous.closed:
            previous.close(SUPERSEDED)

    def release(self, consumer: str, resource: str, sub: Subscription) -> None:
        if self._open.get((consumer, resource)) is sub:
            del self._open[(consumer, resource)]


def _networks(entries: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(entry, strict=False) for entry in entries]


class ClientAddress:
    """The client's address: the peer, or the first untrusted hop of X-Forwarded-For behind trusted proxies."""

    def __init__(self, trusted_proxies: Iterable[str]) -> None:
        self._trusted = _networks(trusted_proxies)

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def resolve(self, peer: str, forwarded_for: str | None) -> str:
        if not self._trusted or not forwarded_for or not self._is_trusted(peer):
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer
