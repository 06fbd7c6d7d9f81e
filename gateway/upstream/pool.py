"""The upstream feeds' runner: one task per target, talking to the upstream directly.

In-process (`broker.kind: memory`) it feeds the hub's topics itself; in shared mode the Redis
broker hands it the fenced writer of each stream this replica holds the lease for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import httpx

from gateway.codec.closes import UPSTREAM_UNAVAILABLE
from gateway.codec.streams import JOB_KIND
from gateway.config import UpstreamConfig
from gateway.hub.ports import FeedTarget
from gateway.logs import new_request_id, request_id
from gateway.metrics import Metrics
from gateway.upstream.health import UpstreamHealth
from gateway.upstream.job_mux import OptimizationMux
from gateway.upstream.sse_feed import SSEFeed

log = logging.getLogger("gateway.upstream")


class UpstreamPool:
    """The in-process broker: one feed task per topic, talking to the upstream directly."""

    def __init__(self, config: UpstreamConfig, metrics: Metrics, clock: Callable[[], float],
                 client: httpx.AsyncClient | None = None, health: UpstreamHealth | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        #: Shared record of upstream answers and failures, read by `/readyz`.
        self.health = health or UpstreamHealth(clock)
        self.client = client or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
            follow_redirects=False,  # the API key goes to the upstream's origin only
        )
        #: Keyed by the fed object itself: in shared mode a replica can lose and retake a lease, and
        #: the old feed's teardown must never cancel the new one for the same resource.
        self._tasks: dict[object, asyncio.Task[None]] = {}
        #: The running feed of each target, for `describe`.
        self._feeds: dict[object, SSEFeed] = {}
        #: Optimization jobs share one upstream WebSocket instead of a feed each.
        self.mux = OptimizationMux(config, metrics, clock, health=self.health)

    def attach(self, topic: FeedTarget) -> None:
        if topic.kind == JOB_KIND:
            self.mux.attach(topic)
            return
        task = asyncio.get_running_loop().create_task(self._run(topic), name=f"feed {topic.kind}")
        self._tasks[topic] = task

    async def _run(self, topic: FeedTarget) -> None:
        # The feed outlives the request that opened it: give its log lines their own id.
        opened_by = request_id.get()
        request_id.set(new_request_id())
        log.info("upstream feed started", extra={"stream_kind": topic.kind, "opened_by": opened_by})
        feed: SSEFeed | None = None
        try:
            feed = self._feeds[topic] = SSEFeed(topic, self.client, self.config, self.metrics, self.clock,
                                                health=self.health)
            await feed.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("upstream feed crashed", extra={"stream_kind": topic.kind})
            topic.end(UPSTREAM_UNAVAILABLE, "internal error in the upstream feed")
        finally:
            if self._tasks.get(topic) is asyncio.current_task():
                del self._tasks[topic]
            if feed is not None and self._feeds.get(topic) is feed:
                del self._feeds[topic]

    def describe(self, target: FeedTarget) -> dict[str, Any]:
        """The upstream state of `target`'s feed (see `SSEFeed.describe`, `OptimizationMux.describe`)."""
        if target.kind == JOB_KIND:
            return self.mux.describe(target)
        feed = self._feeds.get(target)
        if feed is not None:
            return feed.describe()
        if target in self._tasks and not target.ended:
            return {"state": "connecting", "attempt": 0, "retry_in": None}  # its task has not started yet
        return {"state": "ended"}

    async def detach(self, topic: FeedTarget) -> None:
        if topic.kind == JOB_KIND:
            await self.mux.detach(topic)
            return
        task = self._tasks.pop(topic, None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def aclose(self) -> None:
        await self.mux.aclose()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        await self.client.aclose()
