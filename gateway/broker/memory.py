"""The in-process broker (`broker.kind: memory`): this process's upstream pool feeds its topics directly.

One replica only: every process would otherwise open its own upstream stream per resource,
and the upstream allows one per consumer.
"""

from __future__ import annotations

from typing import Any

from gateway.hub.ports import FeedRunner
from gateway.hub.topic import Topic


class MemoryBroker:
    """The `Broker` of a single process: each topic is the target of its own upstream feed."""

    def __init__(self, pool: FeedRunner) -> None:
        self.pool = pool

    def attach(self, topic: Topic) -> None:
        self.pool.attach(topic)

    async def detach(self, topic: Topic) -> None:
        await self.pool.detach(topic)

    async def describe(self, topic: Topic) -> dict[str, Any]:
        return self.pool.describe(topic)
