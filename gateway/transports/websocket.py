"""Browser WebSocket (`/ws`): many stream subscriptions over one socket, as a raw ASGI endpoint.

Admission happens before the upgrade: a bad token, a foreign Origin or a full gateway is
answered with a plain HTTP 401/403/429/503 (the `websocket.http.response` extension), so
nothing is accepted and nothing is opened upstream. Each accepted socket is one
`WSConnection` (`transports.ws_connection`), driven by callbacks from its channel: the socket
itself once the server hands it over (`transports.ws_socket`), or ASGI (`transports.ws_fallback`).
One keepalive pass pings every silent socket, rather than a timer per socket.

Per-subscription endings (superseded, inactivity, upstream failure) are an `error` frame
followed by `unsubscribed`; the socket stays open. Socket-wide endings (drain, slow
consumer, token expiry, abuse) are the close codes of `codec.closes`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.auth.address import header_map
from gateway.auth.admission import Admission
from gateway.codec import ws_messages as proto
from gateway.codec.closes import SHUTTING_DOWN, SLOW_CONSUMER, CloseReason
from gateway.codec.streams import KINDS
from gateway.config import LimitsConfig, WebSocketConfig
from gateway.errors import GatewayError, LimitError
from gateway.logs import new_request_id, request_id
from gateway.metrics import Deliveries, Metrics
from gateway.transports.direct import ws_detacher
from gateway.transports.ending import Expiries
from gateway.transports.ws_connection import WSConnection
from gateway.transports.ws_fallback import ASGIChannel
from gateway.transports.ws_socket import WSChannel
from gateway.types import Receive, Scope, Send

log = logging.getLogger("gateway.ws")

DENIAL_CODES = {401: 4401, 403: 4403}
"""Close codes after accept, for servers without the `websocket.http.response` extension."""
TRY_AGAIN_LATER = 1013
KEEPALIVE_PASS = 5.0
"""Most seconds between two keepalive passes over every socket (a quarter of the ping settings if less)."""


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
        #: The subscriber gauge's children, looked up once rather than per subscription.
        self.subscribers = {kind: metrics.subscribers.labels("ws", kind) for kind in KINDS}

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

    async def run_keepalive(self) -> None:
        """One clock for every socket: ping the silent ones, drop the dead and the stuck."""
        interval, timeout = self.config.ping_interval, self.config.ping_timeout
        while True:
            await asyncio.sleep(min(KEEPALIVE_PASS, interval / 4, timeout / 4))
            now, heard_clock = self.clock(), time.monotonic()
            stuck_after = self.limits.send_timeout
            for connection in list(self.connections):
                try:
                    connection.channel.keepalive(heard_clock, interval, timeout)
                    if connection.stalled_since and now - connection.stalled_since > stuck_after:
                        connection.close(SLOW_CONSUMER)  # full for `send_timeout` with nothing the hub watches
                except Exception:  # pragma: no cover - one socket's failure must not stop the pass
                    log.exception("websocket keepalive failed", extra={"transport": "ws"})
                    connection.channel.abort()

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
        del headers, message  # only what the socket needs stays referenced
        offered = scope.get("subprotocols") or []
        subprotocol = proto.SUBPROTOCOL if proto.SUBPROTOCOL in offered else None
        try:
            await send({"type": "websocket.accept", "subprotocol": subprotocol})
        except BaseException as exc:
            hold.release()
            if isinstance(exc, OSError):
                return  # the client left during the handshake
            raise
        log.debug("websocket opened", extra={"transport": "ws"})
        connection = WSConnection(self, admitted, hold)
        # Right after the accept, before any await: the server may hand the socket over as it is.
        detach = ws_detacher(scope)
        socket = detach(connection, self.config.max_message_bytes) if detach is not None else None
        if socket is not None:
            self._start(connection, socket)
            return  # the socket is the connection's now; this ASGI call is done
        channel = ASGIChannel(receive, send)
        self._start(connection, channel)
        await channel.run(connection)

    def _start(self, connection: WSConnection, channel: WSChannel) -> None:
        connection.channel = channel
        self.connections.add(connection)
        if self.draining:
            connection.close(SHUTTING_DOWN)


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
