"""The gateway as one ASGI application, built from a config with every dependency injected.

Stream paths go straight to the raw SSE endpoint (the hot path); everything else
(polling, health, metrics, WebSocket, dashboard, browser client library) is a small
Starlette app. Lifespan starts the hub's clock; `begin_drain` (called on SIGTERM) makes
readiness fail and tells every stream to reconnect elsewhere, so the server's own shutdown
finds nothing to wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route

from gateway.auth.admission import Admission
from gateway.auth.authz import Authorizer
from gateway.auth.recheck import Rechecker
from gateway.auth.tokens import Authenticator
from gateway.broker.memory import MemoryBroker
from gateway.broker.redis.broker import RedisBroker
from gateway.broker.redis.caches import RedisDecisionCache, RedisPollCache
from gateway.broker.redis.client import RedisClient
from gateway.broker.redis.exclusive import RedisExclusive
from gateway.codec.closes import SHUTTING_DOWN
from gateway.codec.streams import LISTABLE_KINDS
from gateway.config import GatewayConfig
from gateway.hub.ports import Broker
from gateway.hub.registry import Hub
from gateway.limits.connections import ConnectionLimiter
from gateway.limits.exclusive import ExclusiveStreams
from gateway.limits.quota import StreamQuota
from gateway.logs import RequestIdMiddleware
from gateway.metrics import Metrics, MetricsApp
from gateway.transports.admin import PREFIX as ADMIN_PREFIX
from gateway.transports.admin import AdminApi
from gateway.transports.client_library import ClientLibrary
from gateway.transports.dashboard import Dashboard
from gateway.transports.ending import Expiries
from gateway.transports.http import HttpEndpoints, http_error, server_error
from gateway.transports.listing import Listings
from gateway.transports.sse import SSEStreams
from gateway.transports.websocket import WebSocketStreams
from gateway.types import Receive, Scope, Send
from gateway.upstream.health import UpstreamHealth
from gateway.upstream.polling import Poller
from gateway.upstream.pool import UpstreamPool

log = logging.getLogger("gateway.app")

_STREAM_PATH = re.compile(r"/api/v1/([a-z-]+)/([^/]+)/stream")


class GatewayApp:
    """The gateway's ASGI callable and the services behind it."""

    def __init__(self, config: GatewayConfig, *, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic, broker: Broker | None = None,
                 http_client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.clock = clock
        self.metrics = Metrics(registry)
        self.http = http_client or httpx.AsyncClient(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
            follow_redirects=False)  # the API key goes to the upstream's origin only
        self.health = UpstreamHealth(clock)
        self.pool = UpstreamPool(config.upstream, self.metrics, clock, self.http, health=self.health)
        #: Set in shared mode (`broker.kind: redis`): leases, shared history and caches.
        self.redis: RedisClient | None = None
        self.shared: RedisBroker | None = None
        if broker is None and config.broker.kind == "redis":
            self.redis = RedisClient(config.broker, self.metrics, clock)
            redis = self.redis
            self.metrics.watch_broker(lambda: (redis.healthy, redis.down_for()))
            broker = self.shared = RedisBroker(config.broker, config.limits, self.pool, self.metrics, self.redis,
                                               clock)
        self.broker: Broker = broker or MemoryBroker(self.pool)
        self.hub = Hub(config.limits, self.broker, self.metrics, clock)
        self.authenticator = Authenticator(config.auth, self.http)
        self.authorizer = Authorizer(
            config.auth, self.http,
            cache=RedisDecisionCache(self.redis, config.auth.authorize_cache_ttl) if self.redis else None)
        self.cluster_exclusive = (RedisExclusive(self.redis, config.limits.one_stream_per_consumer,
                                                 self.shared.notices if self.shared else None)
                                  if self.redis else None)
        self.limiter = ConnectionLimiter(config.server)
        self.quota = StreamQuota(config.limits.max_streams_per_consumer)
        self.exclusive = ExclusiveStreams(config.limits, cluster=self.cluster_exclusive)
        self.admission = Admission(config.server, self.authenticator, self.authorizer, self.metrics, hub=self.hub,
                                   limiter=self.limiter, quota=self.quota, exclusive=self.exclusive)
        self.expiries = Expiries()
        self.rechecker = (Rechecker(self.admission, config.auth.recheck_interval)
                          if config.auth.authorize_url else None)
        self.poller = Poller(self.http, config.upstream, config.limits.poll_cache_ttl, self.metrics,
                             health=self.health, cache=RedisPollCache(self.redis) if self.redis else None)
        self.listings = Listings(self.admission, self.authorizer, self.poller)
        self.dashboard = Dashboard(config.auth.cookie) if config.dashboard.enabled else None
        #: `/admin/*` for operators, with `admin.api_key` only (otherwise those paths are 404s).
        self.admin = AdminApi(config.admin.api_key, self.hub, self.metrics, clock) if config.admin.api_key else None
        self.client_library = ClientLibrary()  # always: browsers of any app use it, dashboard or not
        self.endpoints = HttpEndpoints(self.admission, self.poller, self.health, self.http, config.upstream.base_url,
                                       self.metrics.registry, self)
        #: `/metrics` alone, for the separate `metrics.port` listener (`gateway serve` runs it).
        self.metrics_app = MetricsApp(self.metrics.registry) if config.metrics.enabled else None
        self.sse = SSEStreams(self.admission, config.limits, self.metrics, self.expiries, clock)
        self.ws = WebSocketStreams(self.admission, config.limits, config.websocket, self.metrics, self.expiries, clock)
        self.started = False
        self.draining = False
        self._background: list[asyncio.Task[None]] = []
        self.router = Starlette(routes=self._routes(), lifespan=self._lifespan,
                                exception_handlers={HTTPException: http_error, Exception: server_error})
        self.router.add_middleware(RequestIdMiddleware)

    def _routes(self) -> list[Any]:
        endpoints = self.endpoints
        routes: list[Any] = [
            Route("/healthz", endpoints.healthz),
            Route("/readyz", endpoints.readyz),
            *(Route(f"/api/v1/{kind}", self.listings.endpoint, methods=["GET"]) for kind in LISTABLE_KINDS),
            Route("/api/v1/{kind:str}/{resource_id:str}", endpoints.poll, methods=["GET"]),
            *self.client_library.routes(),
        ]
        if self.config.metrics.enabled and self.config.metrics.port is None:
            routes.append(Route("/metrics", endpoints.metrics))
        if self.dashboard is not None:
            routes += self.dashboard.routes()
        return routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            match = _STREAM_PATH.fullmatch(scope["path"])
            if match is not None:
                if scope["method"] == "GET":
                    await self.sse(scope, receive, send, match.group(1), match.group(2))
                    return
                if scope["method"] == "OPTIONS":
                    await self.endpoints.preflight(scope, send)
                    return
            elif scope["method"] == "OPTIONS" and scope["path"].startswith("/api/"):
                await self.endpoints.preflight(scope, send)
                return
            elif self.admin is not None and (scope["path"] + "/").startswith(ADMIN_PREFIX + "/"):
                await self.admin(scope, receive, send)
                return
        elif scope["type"] == "websocket" and scope["path"] == "/ws":
            await self.ws(scope, receive, send)
            return
        await self.router(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        del app
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self.hub.run_ticker()))
        self._background.append(loop.create_task(self.ws.run_keepalive()))
        if self.rechecker is not None:
            self._background.append(loop.create_task(self.rechecker.run()))
        if self.redis is not None:
            self._background.append(loop.create_task(self.redis.watch_health()))
        if self.cluster_exclusive is not None:
            self._background.append(loop.create_task(self.cluster_exclusive.run()))
        if self.shared is not None:
            self._background.append(loop.create_task(self.shared.notices.run()))
        self.started = True
        try:
            yield
        finally:
            await self.aclose()

    def begin_drain(self) -> int:
        """Start of a graceful shutdown: fail readiness and tell every stream to reconnect."""
        if not self.draining:
            self.draining = True
            count = self.hub.close_all(SHUTTING_DOWN)
            self.ws.close_all(SHUTTING_DOWN)  # sockets without subscriptions too
            log.info("draining", extra={"streams": count})
            return count
        return 0

    async def aclose(self) -> None:
        self.begin_drain()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        self.expiries.close()
        await self.hub.aclose()
        if self.shared is not None:
            await self.shared.aclose()
        await self.pool.aclose()
        await self.http.aclose()

    # --- readiness ---------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        """(ready, status): started, not draining, and the upstream answered recently (no evidence: ready)."""
        if not self.started:
            return False, "starting"
        if self.draining:
            return False, "draining"
        if self.redis is not None and self.redis.down_for() > self.config.broker.unready_after:
            # A Redis blip does not empty the load balancer: only an outage longer than unready_after does.
            return False, "redis_unavailable"
        if self.health.reachable() is False:
            return False, "upstream_unreachable"
        return True, "ready"

    def readiness_details(self) -> dict[str, Any]:
        """The broker's state, for /healthz and /readyz."""
        if self.redis is None:
            return {"broker": {"kind": "memory"}}
        down_for = self.redis.down_for()
        return {"broker": {"kind": "redis", "state": "up" if self.redis.healthy else "down",
                           "unavailable_seconds": round(down_for, 3),
                           "unready_after_seconds": self.config.broker.unready_after}}


def create_app(config: GatewayConfig, **kwargs: Any) -> GatewayApp:
    """Build the gateway for `config` (keyword arguments inject registry, clock, broker, client)."""
    return GatewayApp(config, **kwargs)
