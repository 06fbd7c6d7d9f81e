"""Browser WebSocket (`/ws`): many stream subscriptions over one socket, as a raw ASGI endpoint.

Admission happens before the upgrade: a bad token, a foreign Origin or a full gateway is
answered with a plain HTTP 401/403/429/503 (the `websocket.http.response` extension), so
nothing is accepted and nothing is opened upstream. Each accepted socket is one
`WSConnection` (`transports.ws_connection`): a reader that parses client messages
(sans-I/O, `codec.ws_messages`) and the socket's single writer (`transports.ws_writer`).

Per-subscription endings (superseded, inactivity, upstream failure) are an `error` frame
followed by `unsubscribed`; the socket stays open. Socket-wide endings (drain, slow
consumer, token expiry, abuse) are the close codes of `codec.closes`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from gateway.auth.address import header_map
from gateway.auth.admission import Admission, Admitted
from gateway.codec import ws_messages as proto
from gateway.codec.closes import SHUTTING_DOWN, CloseReason
from gateway.config import LimitsConfig, WebSocketConfig
from gateway.errors import GatewayError, LimitError
from gateway.logs import new_request_id, request_id
from gateway.metrics import Deliveries, Metrics
from gateway.transports.direct import frame_output
from gateway.transports.ending import Expiries
from gateway.transports.ws_connection import WSConnection
from gateway.types import Receive, Scope, Send

log = logging.getLogger("gateway.ws")

DENIAL_CODES = {401: 4401, 403: 4403}
"""Close codes after accept, for servers without the `websocket.http.response` extension."""
TRY_AGAIN_LATER = 1013


class WebSocketStreams:
    """The `/ws` endpoint and the registry of its live connections."""

    def __init__(self, admission: Admission, limits: LimitsConfig, config: WebSocketConfig, metrics: Metrics,
                 expiries: Expiries, clock: Callable[[], float] = time.monotonic) -> None:
        self.admission = admission
        self.hub = admission.hub
        self.limits = limits
        self.config = config
        self.metrics = metrics
        self.expiries = expiries
        self.clock = clock
        self.connections: set[WSConnection] = set()
        self.draining = False
        self.deliveries = Deliveries(metrics.frames_sent.labels("ws"), metrics.fanout_delay, clock)
        self.flushes = self.hub.flushes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = request_id.set(new_request_id())
        try:
            await self._handle(scope, receive, send)
        finally:
            request_id.reset(token)

    def close_all(self, reason: CloseReason = SHUTTING_DOWN) -> int:
        """Start of a drain: close every socket (with or without subscriptions) with `reason`."""
        self.draining = True
        for connection in list(self.connections):
            connection.close(reason)
        return len(self.connections)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        headers = header_map(scope)
        try:
            if self.draining:
                error = LimitError("the gateway is restarting", status=503, code="shutting_down", retry_after=1,
                                   reason="draining")
                self.admission.refused(error)
                raise error
            admitted = await self.admission.admit(scope, headers, websocket=True)
            hold = self.admission.connection(admitted)
        except GatewayError as exc:
            await _deny(scope, send, exc)
            return
        del headers, message  # this frame lives as long as the socket: keep only what it needs
        try:
            await self._serve(scope, receive, send, admitted)
        finally:
            hold.release()

    async def _serve(self, scope: Scope, receive: Receive, send: Send, admitted: Admitted) -> None:
        offered = scope.get("subprotocols") or []
        subprotocol = proto.SUBPROTOCOL if proto.SUBPROTOCOL in offered else None
        try:
            await send({"type": "websocket.accept", "subprotocol": subprotocol})
        except OSError:
            return  # the client left during the handshake
        connection = WSConnection(self, receive, send, admitted, frame_output(scope))
        self.connections.add(connection)
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)


async def _deny(scope: Scope, send: Send, exc: GatewayError) -> None:
    """Refuse the upgrade with a real HTTP answer when the server can send one, else close right after accept."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = exc.body()
        headers = [*exc.headers(), (b"content-length", str(len(body)).encode())]
        await send({"type": "websocket.http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
        return
    code = DENIAL_CODES.get(exc.status, TRY_AGAIN_LATER if exc.status in (429, 503) else 1008)
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": code, "reason": exc.code})
