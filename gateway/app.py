"""The gateway as one ASGI application, built from a config with every dependency injected.

Stream paths go straight to the raw SSE endpoint (the hot path); everything else
(polling, health, metrics, WebSocket, dashboard) is a small Starlette app. Lifespan
starts the hub's clock; `begin_drain` (called on SIGTERM) makes readiness fail and tells
every stream to reconnect elsewhere, so the server's own shutdown finds nothing to wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.admission import Admission, header_map, validate_resource
from gateway.auth import Authenticator
from gateway.authz import Authorizer
from gateway.closes import SHUTTING_DOWN
from gateway.config import GatewayConfig
from gateway.errors import GatewayError, respond
from gateway.hub import Broker, Hub
from gateway.limits import ConnectionLimiter, ExclusiveStreams
from gateway.metrics import Metrics
from gateway.polling import Poller
from gateway.sse_stream import SSEStreams
from gateway.types import Receive, Scope, Send
from gateway.upstream import UpstreamPool

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
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32))
        self.pool = UpstreamPool(config.upstream, self.metrics, clock, self.http)
        self.hub = Hub(config.limits, broker or self.pool, self.metrics, clock)
        self.authenticator = Authenticator(config.auth, self.http)
        self.authorizer = Authorizer(config.auth, self.http)
        self.admission = Admission(config.server, self.authenticator, self.authorizer, self.metrics)
        self.limiter = ConnectionLimiter(config.server)
        self.exclusive = ExclusiveStreams(config.limits)
        self.poller = Poller(self.http, config.upstream, config.limits.poll_cache_ttl, self.metrics)
        self.sse = SSEStreams(self.hub, self.admission, self.limiter, self.exclusive, config.limits,
                              self.metrics, clock)
        self.started = False
        self.draining = False
        self._background: list[asyncio.Task[None]] = []
        self.router = Starlette(routes=self._routes(), lifespan=self._lifespan,
                                exception_handlers={HTTPException: _http_error, Exception: _server_error})

    def _routes(self) -> list[Any]:
        routes: list[Any] = [
            Route("/healthz", self._healthz),
            Route("/readyz", self._readyz),
            Route("/api/v1/{kind:str}/{resource_id:str}", self._poll, methods=["GET"]),
        ]
        if self.config.metrics.enabled and self.config.metrics.port is None:
            routes.append(Route("/metrics", self._metrics))
        return routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            match = _STREAM_PATH.fullmatch(scope["path"])
            if match is not None:
                if scope["method"] == "GET":
                    await self.sse(scope, receive, send, match.group(1), match.group(2))
                    return
                if scope["method"] == "OPTIONS":
                    await self._preflight(scope, send)
                    return
            elif scope["method"] == "OPTIONS" and scope["path"].startswith("/api/"):
                await self._preflight(scope, send)
                return
        await self.router(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        del app
        self._background.append(asyncio.get_running_loop().create_task(self.hub.run_ticker()))
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
            log.info("draining", extra={"streams": count})
            return count
        return 0

    async def aclose(self) -> None:
        self.begin_drain()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background.clear()
        await self.hub.aclose()
        await self.pool.aclose()
        await self.http.aclose()

    # --- small endpoints -------------------------------------------------------------

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def ready(self) -> tuple[bool, str]:
        if not self.started:
            return False, "starting"
        if self.draining:
            return False, "draining"
        return True, "ready"

    async def _readyz(self, request: Request) -> Response:
        ok, status = self.ready()
        return JSONResponse({"status": status}, status_code=200 if ok else 503)

    async def _metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _preflight(self, scope: Scope, send: Send) -> None:
        headers = header_map(scope)
        cors = self.admission.cors_headers(headers.get("origin"), scope, headers)
        if not cors:
            await respond(send, GatewayError("origin is not allowed", status=403, code="origin_not_allowed"))
            return
        cors += [(b"access-control-allow-methods", b"GET, OPTIONS"),
                 (b"access-control-allow-headers", b"Authorization, Last-Event-ID, Cache-Control"),
                 (b"access-control-max-age", b"600"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 204, "headers": cors})
        await send({"type": "http.response.body", "body": b""})

    async def _poll(self, request: Request) -> Response:
        headers = header_map(request.scope)
        cors = self.admission.cors_headers(headers.get("origin"), request.scope, headers)
        try:
            kind = request.path_params["kind"]
            if kind == "optimizations":
                raise GatewayError("optimization jobs are not pollable; stream them", status=404,
                                   code="not_found")
            resource = validate_resource(kind, request.path_params["resource_id"])
            await self.admission.admit(request.scope, headers, resource)
        except GatewayError as exc:
            return Response(exc.body(), status_code=exc.status, headers=_str_headers(exc.headers() + cors))
        result = await self.poller.get(resource)
        extra = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        if result.retry_after is not None:
            extra.append((b"retry-after", str(max(1, round(result.retry_after))).encode()))
        return Response(result.body, status_code=result.status, headers=_str_headers(extra + cors))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Framework errors (404, 405) in the gateway's JSON error shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "bad_request")
    error = GatewayError(HTTPStatus(status).phrase.lower(), status=status, code=code)
    return Response(error.body(), status_code=status, headers=_str_headers(error.headers()))


async def _server_error(request: Request, exc: Exception) -> Response:
    error = GatewayError("internal error", status=500, code="internal_error")
    return Response(error.body(), status_code=500, headers=_str_headers(error.headers()))


def _str_headers(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}


def create_app(config: GatewayConfig, **kwargs: Any) -> GatewayApp:
    """Build the gateway for `config` (keyword arguments inject registry, clock, broker, client)."""
    return GatewayApp(config, **kwargs)
