"""The hub's seams, as protocols: what feeds it, what feeds write to, and where it writes.

The hub knows its feeds only as a `Broker` (the in-process pool, or Redis) and its
subscribers only as a cursor plus callbacks (`Subscription`); an upstream feed knows only a
`FeedTarget` (a local topic, or the Redis writer of the replica holding the lease).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from gateway.codec.closes import CloseReason
from gateway.codec.events import Event

if TYPE_CHECKING:
    from gateway.hub.topic import Topic


class Broker(Protocol):
    """What feeds topics: the in-process upstream pool, or the Redis broker."""

    def attach(self, topic: Topic) -> None:
        """Start feeding `topic` (it has just been created for its first subscriber)."""

    async def detach(self, topic: Topic) -> None:
        """Stop feeding `topic` (its last subscriber left and `linger` passed, or the hub closes)."""

    async def describe(self, topic: Topic) -> dict[str, Any]:
        """The upstream side of `topic` for operators: its feed's state and, shared, who holds the stream."""


class FeedTarget(Protocol):
    """What an upstream feed writes to: a topic (in-process), or the holder's Redis writer (shared mode)."""

    @property
    def key(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def resource_id(self) -> str: ...

    @property
    def last_id(self) -> str | None:
        """The id of the last event published (where an upstream resume starts)."""

    @property
    def ordinal(self) -> int:
        """How many events were published (for upstreams without ids)."""

    @property
    def ended(self) -> bool: ...

    def already_has(self, event_id: str) -> bool:
        """Whether an event replayed after a reconnect was published already."""

    def publish(self, event: Event) -> None: ...

    def end(self, reason: CloseReason | None = None, detail: str | None = None) -> None: ...


class FeedRunner(Protocol):
    """What runs upstream feeds (the upstream pool): one per target, until the target ends or is detached."""

    def attach(self, target: FeedTarget) -> None: ...

    async def detach(self, target: FeedTarget) -> None: ...

    def describe(self, target: FeedTarget) -> dict[str, Any]:
        """The state of `target`'s upstream feed (`{"state": "connecting" | "open" | ..., ...}`)."""


class StreamUnavailable(Exception):
    """The hub cannot open another stream right now (stream cap reached)."""


class DirectOutput(Protocol):
    """A subscriber's socket the topic's pass may write the shared bytes to itself."""

    @property
    def paused(self) -> bool:
        """It cannot take a write from the pass now (a full socket, or its owner is busy)."""

    def write(self, data: bytes) -> None: ...


class DeliveryTally(Protocol):
    """Who counts a topic pass's direct writes (once per pass, not once per subscriber)."""

    def delivered(self, writes: int, batch: list[Event]) -> None: ...


class Flushable(Protocol):
    def flush(self) -> None: ...
