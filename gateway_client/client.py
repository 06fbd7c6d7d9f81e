"""`GatewayClient`: the Stratix SDK's streaming shape, pointed at the gateway instead of the upstream.

Notebooks and services watch evaluations and optimization jobs through the gateway with a
gateway session token, so the Stratix API key stays in one place.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from gateway_client.auth import Credentials, TokenSource
from gateway_client.backoff import Backoff
from gateway_client.errors import error_from_response
from gateway_client.events import EVALUATION_TERMINALS, JOB_TERMINALS
from gateway_client.stream import EventStream

DEFAULT_READ_TIMEOUT = 60.0
"""Seconds without a byte before a stream counts as cut (the gateway sends a heartbeat every 15 s)."""
DEFAULT_CONNECT_TIMEOUT = 10.0


class GatewayClient:
    """Entry point: `async with GatewayClient(base_url, token=...) as client`.

    `token` is a string or a sync/async callable returning a fresh token, called on every
    (re)connect. `http_client` is used as given and not closed (its timeouts apply).
    """

    def __init__(self, base_url: str, *, token: TokenSource, backoff: Backoff | None = None,
                 read_timeout: float = DEFAULT_READ_TIMEOUT, http_client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.backoff = backoff or Backoff()
        self.credentials = Credentials(token)
        self._owns_http = http_client is None
        self.http = http_client or httpx.AsyncClient(
            timeout=httpx.Timeout(DEFAULT_CONNECT_TIMEOUT, read=read_timeout))
        self.evaluations = Evaluations(self, "evaluations")
        self.trace_evaluations = Evaluations(self, "trace-evaluations")
        self.optimizations = Optimizations(self, "optimizations")

    def url(self, kind: str, resource_id: str, suffix: str = "") -> str:
        return f"{self.base_url}/api/v1/{kind}/{quote(resource_id, safe='')}{suffix}"

    async def aclose(self) -> None:
        if self._owns_http:
            await self.http.aclose()

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class _Resource:
    terminal: frozenset[str] = frozenset()

    def __init__(self, client: GatewayClient, kind: str) -> None:
        self._client = client
        self.kind = kind

    def stream(self, resource_id: str, *, after_event_id: str | int | None = None) -> EventStream:
        """Events of one resource from the start (or after `after_event_id`) to its terminal event."""
        client = self._client
        return EventStream(client.http, client.url(self.kind, resource_id, "/stream"), client.credentials,
                           terminal=self.terminal, backoff=client.backoff,
                           after_event_id=None if after_event_id is None else str(after_event_id))


class Evaluations(_Resource):
    """`evaluations` and `trace_evaluations`: stream events, or poll the Evaluation object."""

    terminal = EVALUATION_TERMINALS

    async def get(self, resource_id: str) -> Any:
        """`GET /api/v1/{kind}/{id}`: the upstream's Evaluation object (the polling fallback)."""
        client = self._client
        for attempt in range(2):
            response = await client.http.get(client.url(self.kind, resource_id),
                                             headers=await client.credentials.headers())
            if response.status_code == 200:
                return response.json()
            if not (response.status_code == 401 and client.credentials.refreshable and attempt == 0):
                break
        raise error_from_response(response.status_code, response.headers, response.content)


class Optimizations(_Resource):
    """`optimizations`: job event streams (the gateway does not proxy job polling)."""

    terminal = JOB_TERMINALS
