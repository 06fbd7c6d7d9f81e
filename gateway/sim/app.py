"""Routes of the simulator: the Stratix API surface plus the `/_sim/` control plane.

Control endpoints need no API key: they are a loopback tool for tests and benchmarks and
must never be exposed beyond the machine running the simulator.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from gateway.sim.responses import error_response, json_response
from gateway.sim.settings import ResourceOverrides, SimSettings
from gateway.sim.sse_stream import EvaluationStream
from gateway.sim.state import EVALUATION_KINDS, SimState, is_missing, split_resource
from gateway.sim.ws import OptimizationConnection

Endpoint = Callable[[Request], Awaitable[Response]]
PROTECTED_PREFIXES = ("/api/", "/ws/")
JOB_COMMANDS = ("pause", "resume", "cancel")
DROP_MODES = ("abort", "eof")


class ApiKeyGuard:
    """Refuse `/api/` and `/ws/` requests whose `X-API-Key` is not the configured key (401, as Stratix)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self._app = app
        self._api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"].startswith(PROTECTED_PREFIXES):
            presented = Headers(scope=scope).get("x-api-key", "").encode()
            if not hmac.compare_digest(presented, self._api_key):
                denial = error_response(401, "unauthorized", "missing or invalid X-API-Key header")
                if scope["type"] == "http":
                    await denial(scope, receive, send)
                    return
                websocket = WebSocket(scope, receive, send)
                if "websocket.http.response" in scope.get("extensions", {}):
                    await websocket.send_denial_response(denial)
                else:
                    await websocket.close(code=1008, reason="unauthorized")
                return
        await self._app(scope, receive, send)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise HTTPException(400, "request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise HTTPException(400, "request body must be a JSON object")
    return body


def create_sim_app(settings: SimSettings) -> Starlette:
    """A fresh simulator (its own state; nothing shared between apps)."""
    state = SimState(settings)

    def evaluation_get(kind: str) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            evaluation_id: str = request.path_params["evaluation_id"]
            if is_missing(evaluation_id):
                return error_response(404, "not_found", f"evaluation {evaluation_id} not found")
            state.stats(f"{kind}/{evaluation_id}").polls += 1
            return json_response(state.evaluation(kind, evaluation_id).snapshot())
        return endpoint

    def listing(kind: str) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            return json_response(state.listing(kind))
        return endpoint

    async def job_get(request: Request) -> Response:
        job_id: str = request.path_params["job_id"]
        if is_missing(job_id):
            return error_response(404, "not_found", f"optimization job {job_id} not found")
        state.stats(f"optimizations/{job_id}").polls += 1
        return json_response(state.job(job_id).snapshot())

    async def optimization_socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await OptimizationConnection(websocket, state, websocket.headers.get("x-api-key", "")).serve()

    async def sim_stats(request: Request) -> Response:
        return json_response(state.stats_json())

    async def sim_drop(request: Request) -> Response:
        body = await _json_body(request)
        resource = body.get("resource")
        mode = body.get("mode", "abort")
        if resource is not None and not isinstance(resource, str):
            return error_response(400, "invalid_request", "'resource' must be a string")
        if mode not in DROP_MODES:
            return error_response(400, "invalid_request", f"'mode' must be one of {', '.join(DROP_MODES)}")
        return json_response({"dropped": state.drop(resource, mode)})

    async def sim_configure(request: Request) -> Response:
        body = await _json_body(request)
        resource = body.get("resource")
        try:
            if not isinstance(resource, str):
                raise ValueError("'resource' is required")
            split_resource(resource)
            overrides = ResourceOverrides.parse(body)
        except ValueError as exc:
            return error_response(400, "invalid_request", str(exc))
        if not state.configure(resource, overrides):
            return error_response(409, "already_started", f"{resource} already started; configure it first")
        return json_response({"resource": resource, "overrides": {
            k: v for k, v in asdict(overrides).items() if v is not None}})

    async def sim_job_command(request: Request) -> Response:
        job_id: str = request.path_params["job_id"]
        command: str = request.path_params["command"]
        if command not in JOB_COMMANDS:
            return error_response(404, "not_found", f"unknown job command {command!r}")
        if is_missing(job_id):
            return error_response(404, "not_found", f"optimization job {job_id} not found")
        run = state.job(job_id)
        if run.finished:
            return error_response(409, "job_finished", f"job {job_id} already ended ({run.status})")
        run.command(command)
        return json_response({"id": job_id, "command": command, "status": run.status})

    async def sim_reset(request: Request) -> Response:
        await state.reset()
        return json_response({"reset": True})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        codes = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, codes.get(exc.status_code, "error"), exc.detail)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await state.aclose()

    routes: list[Route | WebSocketRoute] = [
        Route("/api/v1/evaluations", listing("evaluations"), methods=["GET"]),
    ]
    for kind in EVALUATION_KINDS:
        routes += [
            Route(f"/api/v1/{kind}/{{evaluation_id}}", evaluation_get(kind), methods=["GET"]),
            Route(f"/api/v1/{kind}/{{evaluation_id}}/stream", EvaluationStream(state, kind), methods=["GET"]),
        ]
    routes += [
        Route("/api/v1/optimizations", listing("optimizations"), methods=["GET"]),
        Route("/api/v1/optimizations/{job_id}", job_get, methods=["GET"]),
        WebSocketRoute("/ws/optimization", optimization_socket),
        Route("/_sim/stats", sim_stats, methods=["GET"]),
        Route("/_sim/drop", sim_drop, methods=["POST"]),
        Route("/_sim/configure", sim_configure, methods=["POST"]),
        Route("/_sim/jobs/{job_id}/{command}", sim_job_command, methods=["POST"]),
        Route("/_sim/reset", sim_reset, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.add_middleware(ApiKeyGuard, api_key=settings.api_key)
    app.state.sim = state
    return app
