"""Who may watch what.

A token's streams claim lists `<kind>/<id>` patterns with `*` wildcards
(`["evaluations/*", "optimizations/job-42"]`). A resource no pattern grants is refused
with 403 before anything is opened upstream, unless `auth.authorize_url` is set: then
the webhook decides what the token cannot carry (say, per-evaluation ownership). Its
decisions are cached for `authorize_cache_ttl` seconds, and any webhook failure denies.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Protocol

import httpx

from gateway.auth.tokens import Principal
from gateway.config import AuthConfig
from gateway.errors import AuthError

_CACHE_LIMIT = 10000


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile("".join("[^/]*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern)))


def pattern_allows(patterns: Iterable[str], resource: str) -> bool:
    """Whether any `<kind>/<id>` pattern (with `*` wildcards) matches `resource`."""
    return any(_compile(p).fullmatch(resource) for p in patterns if "/" in p)


class DecisionStore(Protocol):
    """Where webhook decisions are cached: this process or every replica (Redis)."""

    async def get(self, consumer: str, resource: str) -> bool | None: ...

    async def put(self, consumer: str, resource: str, allowed: bool) -> None: ...


class DecisionCache:
    """A small TTL cache of webhook decisions (the Redis broker shares it across replicas)."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[bool, float]] = OrderedDict()

    async def get(self, consumer: str, resource: str) -> bool | None:
        entry = self._entries.get((consumer, resource))
        if entry is None or entry[1] < self.clock():
            return None
        return entry[0]

    async def put(self, consumer: str, resource: str, allowed: bool) -> None:
        if self.ttl <= 0:
            return
        self._entries[(consumer, resource)] = (allowed, self.clock() + self.ttl)
        self._entries.move_to_end((consumer, resource))
        while len(self._entries) > _CACHE_LIMIT:
            self._entries.popitem(last=False)


class Authorizer:
    """Decides whether a principal may open a resource; raises AuthError(403) if not.

    The webhook is protected from being flooded through the gateway: at most
    `authorize_concurrency` calls run at once (others wait, within `authorize_timeout`);
    concurrent checks of one (consumer, resource) share one call; denials are cached for
    `authorize_cache_ttl` and failures (timeout, non-200, bad JSON) for `authorize_failure_ttl`.
    """

    def __init__(self, config: AuthConfig, client: httpx.AsyncClient | None = None,
                 cache: DecisionStore | None = None, failures: DecisionCache | None = None) -> None:
        self.config = config
        self._client = client
        self.cache: DecisionStore = cache or DecisionCache(config.authorize_cache_ttl)
        #: Failed calls, remembered briefly (in this process) so a broken webhook is not hammered.
        self.failures = failures or DecisionCache(config.authorize_failure_ttl)
        self._slots = asyncio.Semaphore(config.authorize_concurrency)
        self._inflight: dict[tuple[str, str], asyncio.Future[bool | None]] = {}

    def granted_by_claim(self, principal: Principal, resource: str) -> bool:
        return pattern_allows(principal.streams, resource)

    async def check(self, principal: Principal, resource: str) -> None:
        if pattern_allows(principal.streams, resource):
            return
        if self.config.authorize_url is None:
            raise AuthError(f"not allowed to open {resource}", status=403, code="forbidden", reason="forbidden")
        allowed = await self.cache.get(principal.consumer, resource)
        if allowed is None:
            failed_recently = await self.failures.get(principal.consumer, resource) is not None
            allowed = None if failed_recently else await self._decide(principal, resource)
        if not allowed:
            raise AuthError(f"not allowed to open {resource}", status=403, code="forbidden",
                            reason="forbidden" if allowed is False else "webhook_failed")

    async def recheck(self, principal: Principal, resource: str) -> bool | None:
        """Ask the webhook again, past the cache (for streams already open); None when it cannot answer."""
        return await self._decide(principal, resource)

    async def _decide(self, principal: Principal, resource: str) -> bool | None:
        """One webhook answer per (consumer, resource) at a time, cached either way."""
        pair = (principal.consumer, resource)
        inflight = self._inflight.get(pair)
        if inflight is not None:
            return await asyncio.shield(inflight)
        future: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
        self._inflight[pair] = future
        try:
            allowed = await self._ask(principal, resource)
            if allowed is None:
                await self.failures.put(principal.consumer, resource, False)
            else:
                await self.cache.put(principal.consumer, resource, allowed)
            future.set_result(allowed)
            return allowed
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it; nobody else must log it
            raise
        finally:
            del self._inflight[pair]

    async def _ask(self, principal: Principal, resource: str) -> bool | None:
        """The webhook's answer; None (deny) when it fails or no call slot frees up in time."""
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False)
        claims = {k: v for k, v in principal.claims.items() if isinstance(k, str)}
        try:
            async with asyncio.timeout(self.config.authorize_timeout):
                async with self._slots:
                    response = await self._client.post(
                        str(self.config.authorize_url),
                        json={"consumer": principal.consumer, "claims": claims, "resource": resource},
                        follow_redirects=False,
                    )
        except (httpx.HTTPError, TimeoutError):
            return None
        if response.status_code in (401, 403):
            return False
        if response.status_code != 200:
            return None
        try:
            body = response.json()
        except ValueError:
            return None
        return bool(isinstance(body, dict) and body.get("allow") is True)
