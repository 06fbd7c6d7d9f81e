"""One open stream per (consumer, resource), as the upstream allows: across SSE and WebSocket, and replicas.

With `replace` the older stream is closed as `superseded` (a refreshed tab is never locked
out); with `reject` the newcomer gets 409 `stream_already_open`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from gateway.codec.closes import SUPERSEDED, CloseReason
from gateway.config import LimitsConfig
from gateway.errors import LimitError


class Closable(Protocol):
    """A stream as this rule sees it: open or closed, and closable with a reason (a hub subscription)."""

    @property
    def closed(self) -> bool: ...

    def close(self, reason: CloseReason | None) -> None: ...


class ClusterExclusive(Protocol):
    """The cluster-wide half of the one-stream rule (the Redis broker provides it)."""

    async def acquire(self, consumer: str, resource: str, sub: Closable) -> None: ...

    async def release(self, consumer: str, resource: str, sub: Closable) -> None: ...


class ExclusiveStreams:
    """One open stream per (consumer, resource), across transports (and replicas, with a cluster)."""

    def __init__(self, limits: LimitsConfig, cluster: ClusterExclusive | None = None) -> None:
        self.policy = limits.one_stream_per_consumer
        self._open: dict[tuple[str, str], Closable] = {}
        self.cluster = cluster
        self._tasks: set[asyncio.Task[None]] = set()

    async def acquire(self, consumer: str, resource: str, sub: Closable) -> None:
        """Check, take the cluster-wide claim (if any), then claim locally; raises LimitError (409)."""
        self.check(consumer, resource)
        if self.cluster is not None:
            await self.cluster.acquire(consumer, resource, sub)
        self.claim(consumer, resource, sub)

    def leave(self, consumer: str, resource: str, sub: Closable) -> None:
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

    def claim(self, consumer: str, resource: str, sub: Closable) -> None:
        """Make `sub` the consumer's stream for `resource`, superseding an older one."""
        self.check(consumer, resource)
        previous = self._open.get((consumer, resource))
        self._open[(consumer, resource)] = sub
        if previous is not None and previous is not sub and not previous.closed:
            previous.close(SUPERSEDED)

    def release(self, consumer: str, resource: str, sub: Closable) -> None:
        if self._open.get((consumer, resource)) is sub:
            del self._open[(consumer, resource)]
