"""The polling fallback, with request coalescing.

Browsers that cannot stream (or were told to poll after an inactivity close) poll
`GET /api/v1/{kind}/{id}`. However many poll one resource, the upstream sees at most
one request per `limits.poll_cache_ttl`: concurrent polls share one in-flight request
and later ones are served from a short cache. An upstream 429 is remembered until its
`Retry-After` passes, so a rate limit is answered locally instead of amplified.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import httpx

from gateway.codec.events import browser_json
from gateway.config import UpstreamConfig
from gateway.metrics import Metrics
from gateway.upstream.answers import read_limited, read_prefix, redirect_target, upstream_error_code
from gateway.upstream.backoff import parse_retry_after
from gateway.upstream.health import UpstreamHealth

log = logging.getLogger("gateway.polling")
_CACHE_LIMIT = 10000


@dataclass(frozen=True, slots=True)
class PollResult:
    status: int
    body: bytes
    retry_after: float | None = None


class ResultCache(Protocol):
    """Where poll results are shared: this process (`PollCache`) or every replica (Redis)."""

    async def get(self, resource: str) -> PollResult | None: ...

    async def put(self, resource: str, result: PollResult, ttl: float) -> None: ...


class PollCache:
    """Recent poll results by resource (the Redis broker shares this across replicas)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._entries: dict[str, tuple[PollResult, float]] = {}

    async def get(self, resource: str) -> PollResult | None:
        entry = self._entries.get(resource)
        if entry is None:
            return None
        if entry[1] <= self.clock():
            del self._entries[resource]
            return None
        return entry[0]

    async def put(self, resource: str, result: PollResult, ttl: float) -> None:
        if ttl <= 0:
            return
        if len(self._entries) >= _CACHE_LIMIT:
            now = self.clock()
            for key in [k for k, (_, exp) in self._entries.items() if exp <= now]:
                del self._entries[key]
            if len(self._entries) >= _CACHE_LIMIT:
                self._entries.pop(next(iter(self._entries)))
        self._entries[resource] = (result, self.clock() + ttl)


class Poller:
    """Fetches a resource's current state from upstream, coalescing concurrent and recent polls."""

    def __init__(self, client: httpx.AsyncClient, config: UpstreamConfig, ttl: float, metrics: Metrics,
                 cache: ResultCache | None = None, health: UpstreamHealth | None = None) -> None:
        self.client = client
        self.health = health or UpstreamHealth()
        self.config = config
        self.ttl = ttl
        self.metrics = metrics
        self.cache: ResultCache = cache or PollCache()
        self._inflight: dict[str, asyncio.Future[PollResult]] = {}

    async def get(self, resource: str) -> PollResult:
        cached = await self.cache.get(resource)
        if cached is not None:
            self.metrics.polls.labels("cached").inc()
            return cached
        inflight = self._inflight.get(resource)
        if inflight is not None:
            self.metrics.polls.labels("coalesced").inc()
            return await asyncio.shield(inflight)
        self.metrics.polls.labels("upstream").inc()
        future: asyncio.Future[PollResult] = asyncio.get_running_loop().create_future()
        self._inflight[resource] = future
        try:
            result = await self._fetch(resource)
            ttl = result.retry_after if result.status == 429 and result.retry_after else self.ttl
            if result.status in (200, 404, 429):
                await self.cache.put(resource, result, ttl)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it; nobody else must log it
            raise
        finally:
            del self._inflight[resource]

    async def _fetch(self, resource: str) -> PollResult:
        url = f"{self.config.base_url}/api/v1/{resource}"
        try:
            async with self.client.stream(
                    "GET", url, headers={"X-API-Key": self.config.api_key or "", "Accept": "application/json"},
                    timeout=httpx.Timeout(self.config.connect_timeout), follow_redirects=False) as response:
                status = response.status_code
                if status >= 500:
                    self.health.failure("http_5xx")
                else:
                    self.health.success()
                return await self._result(resource, response)
        except httpx.HTTPError as exc:
            self.health.failure("timeout" if isinstance(exc, httpx.TimeoutException) else "error")
            return PollResult(502, _error("upstream_unavailable", "upstream did not answer"))

    async def _result(self, resource: str, response: httpx.Response) -> PollResult:
        """The browser's answer for one upstream answer; a body is passed on only whole and as JSON."""
        status = response.status_code
        if status == 200:
            body = await read_limited(response, self.config.max_response_bytes)
            if body is None:
                log.warning("upstream answer too large", extra={"limit": self.config.max_response_bytes})
                return PollResult(502, _error("upstream_too_large", "the upstream's answer is larger than the "
                                                                    "gateway passes on"))
            try:
                safe = browser_json(body.decode("utf-8"))
            except UnicodeDecodeError:
                safe = None
            if safe is None:
                return PollResult(502, _error("upstream_error", "the upstream's answer was not JSON"))
            return PollResult(200, safe.encode())
        if 300 <= status < 400:
            log.warning("upstream redirect refused", extra={
                "status": status, "location_origin": redirect_target(response.headers.get("location"))})
            return PollResult(502, _error("upstream_error", f"upstream answered {status}; redirects are not followed"))
        if status == 429:
            retry = parse_retry_after(response.headers.get("retry-after")) or 1.0
            return PollResult(429, _error("rate_limited", "upstream rate limit; retry later"), retry)
        if status == 404:
            return PollResult(404, _error("not_found", f"{resource} was not found upstream"))
        if status in (401, 403):
            return PollResult(502, _error("upstream_refused", "upstream refused the gateway's credentials"))
        code = upstream_error_code(await read_prefix(response)) or "upstream_error"
        return PollResult(502, _error(code, f"upstream answered {status}"))


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
