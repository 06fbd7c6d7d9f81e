"""Is the upstream reachable? Passive evidence from feeds and polls, an active probe when it is stale.

Feeds and the poller record every answer they get (`success`) and every connection
failure, timeout or 5xx (`failure`). Readiness asks `reachable()`: a success within
`window` seconds is enough. Only when there is none (an idle gateway, or an upstream
that keeps failing) does `refresh()` send one probe, at most once per `probe_interval`,
so a Kubernetes readiness probe never turns into load on the upstream. A single failed
request while other requests succeed does not flip readiness (every replica shares the
upstream; failing them all at once for a blip would be an outage of our own making).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

#: Seconds a successful upstream answer counts as "reachable recently".
READY_WINDOW = 30.0
#: Least seconds between two active probes (a failed probe is reused until then).
PROBE_INTERVAL = 5.0
#: Seconds an active probe may take before it counts as a failure.
PROBE_TIMEOUT = 2.0


class UpstreamHealth:
    """The latest upstream success and failure, shared by every upstream client of one app."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: float = READY_WINDOW,
                 probe_interval: float = PROBE_INTERVAL) -> None:
        self.clock = clock
        self.window = window
        self.probe_interval = probe_interval
        self.last_success: float | None = None
        self.last_failure: float | None = None
        #: Low-cardinality reason of the last failure ("timeout", "error", "http_5xx", ...), never a message.
        self.last_error: str | None = None
        self._last_probe: float | None = None
        self._probe: asyncio.Task[None] | None = None

    def success(self) -> None:
        """The upstream answered (any status below 500)."""
        self.last_success = self.clock()

    def failure(self, reason: str) -> None:
        """The upstream did not answer, timed out or answered 5xx."""
        self.last_failure = self.clock()
        self.last_error = reason

    def reachable(self) -> bool | None:
        """True: an answer within `window`; False: failures since; None: no recent evidence either way."""
        now = self.clock()
        if self.last_success is not None and now - self.last_success <= self.window:
            return True
        if self.last_failure is not None and now - self.last_failure <= self.window:
            return False
        return None

    async def refresh(self, client: httpx.AsyncClient, base_url: str) -> None:
        """Probe the upstream if there is no recent success and no recent probe (one probe at a time)."""
        if self.reachable() is True:
            return
        now = self.clock()
        if self._probe is None and (self._last_probe is None or now - self._last_probe >= self.probe_interval):
            self._last_probe = now
            self._probe = asyncio.get_running_loop().create_task(self._run_probe(client, base_url))
        if self._probe is not None:
            await asyncio.shield(self._probe)

    async def _run_probe(self, client: httpx.AsyncClient, base_url: str) -> None:
        # No API key: any HTTP answer proves the upstream is there, and a probe must never spend
        # the key's rate limit or put the key on one more request.
        try:
            response = await client.get(f"{base_url}/api/v1/evaluations", timeout=PROBE_TIMEOUT)
            await response.aclose()
            if response.status_code >= 500:
                self.failure("http_5xx")
            else:
                self.success()
        except httpx.TimeoutException:
            self.failure("timeout")
        except httpx.HTTPError:
            self.failure("error")
        finally:
            self._probe = None

    def describe(self) -> dict[str, Any]:
        """The evidence, for `/readyz` (ages in seconds; no secrets, no URLs)."""
        now = self.clock()

        def age(at: float | None) -> float | None:
            return None if at is None else round(now - at, 3)

        return {"reachable": self.reachable(), "last_success_age_seconds": age(self.last_success),
                "last_failure_age_seconds": age(self.last_failure), "last_error": self.last_error}
