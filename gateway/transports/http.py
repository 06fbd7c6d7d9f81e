"""The plain HTTP endpoints: health, readiness, metrics, CORS preflight and polling.

Small request/response handlers (Starlette routes, or raw ASGI for the preflight) in the
gateway's JSON error shape; the streams are elsewhere (`transports.sse`, `transports.websocket`).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, Protocol

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.auth.address import header_map
from gateway.auth.admission import Admission, validate_resource
from gateway.codec.streams import KINDS, POLLABLE_KINDS
from gateway.errors import GatewayError, respond
from gateway.types import Scope, Send
from gateway.upstream.health import UpstreamHealth
from gateway.upstream.polling import Poller


class Lifecycle(Protocol):
    """What readiness reports on: the app's own state."""

    started: bool
    draining: bool

    def ready(self) -> tuple[bool, str]: ...

    def readiness_details(self) -> dict[str, Any]: ...


class HttpEndpoints:
    """Health, readiness, metrics, preflight and polling, with every dependency injected."""

    def __init__(self, admission: Admission, poller: Poller, health: UpstreamHealth, http: httpx.AsyncClient,
                 upstream_base_url: str, registry: CollectorRegistry, lifecycle: Lifecycle) -> None:
        self.admission = admission
        self.poller = poller
        self.health = health
        self.http = http
        self.upstream_base_url = upstream_base_url
        self.registry = registry
        self.lifecycle = lifecycle

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", **self.lifecycle.readiness_details()})

    async def readyz(self, request: Request) -> Response:
        lifecycle = self.lifecycle
        if lifecycle.started and not lifecycle.draining:
            await self.health.refresh(self.http, self.upstream_base_url)
        ok, status = lifecycle.ready()
        body = {"status": status, "ready": ok, "started": lifecycle.started, "draining": lifecycle.draining,
                "upstream": self.health.describe(), **lifecycle.readiness_details()}
        return JSONResponse(body, status_code=200 if ok else 503, headers={"cache-control": "no-store"})

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def preflight(self, scope: Scope, send: Send) -> None:
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

    async def poll(self, request: Request) -> Response:
        headers = header_map(request.scope)
        cors = self.admission.cors_headers(headers.get("origin"), request.scope, headers)
        try:
            kind = request.path_params["kind"]
            if kind in KINDS and kind not in POLLABLE_KINDS:
                raise GatewayError("optimization jobs are not pollable; stream them", status=404, code="not_found")
            resource = validate_resource(kind, request.path_params["resource_id"])
            admitted = await self.admission.admit(request.scope, headers)
            await self.admission.authorize(admitted, resource)
        except GatewayError as exc:
            return Response(exc.body(), status_code=exc.status, headers=str_headers(exc.headers() + cors))
        result = await self.poller.get(resource)
        extra = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        if result.retry_after is not None:
            extra.append((b"retry-after", str(max(1, round(result.retry_after))).encode()))
        return Response(result.body, status_code=result.status, headers=str_headers(extra + cors))


async def http_error(request: Request, exc: Exception) -> Response:
    """Framework errors (404, 405) in the gateway's JSON error shape."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "bad_request")
    error = GatewayError(HTTPStatus(status).phrase.lower(), status=status, code=code)
    return Response(error.body(), status_code=status, headers=str_headers(error.headers()))


async def server_error(request: Request, exc: Exception) -> Response:
    error = GatewayError("internal error", status=500, code="internal_error")
    return Response(error.body(), status_code=500, headers=str_headers(error.headers()))


def str_headers(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
