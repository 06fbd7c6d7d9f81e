"""Direct output for long-lived responses: an ASGI extension that hands the socket to the app.

An open ASGI request costs its server a task, a request cycle, a scope, an `asyncio.Event`
and an awaited `send` per write: about 9 KB and a task switch per event for a stream that
only ever writes. Once a stream has been admitted (through ordinary ASGI, so errors keep
their normal responses) the gateway asks for the connection itself through the
`gateway.direct` scope extension; from then on the stream is a few callbacks on the
socket, and the bytes the hub joined once are written to every subscriber as they are.

`DirectHttpProtocol` is uvicorn's httptools protocol with the extension added. Servers
without it (h11, other ASGI servers) simply don't offer it, and streams fall back to
`send`; see `transports.sse`. `DirectWebSocketProtocol` does the same for accepted
WebSockets: after the handshake the socket becomes a `ws_socket.DetachedWebSocket`, which
writes the hub's ready-made frames (an event's frame is the same bytes on every socket, so
it is built once) and parses what the client sends; see `transports.ws_connection`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, Protocol

from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

from gateway.transports.ws_socket import DetachedWebSocket, WSSink

EXTENSION = "gateway.direct"


class Sink(Protocol):
    """The owner of a detached connection."""

    def writable(self) -> None:
        """The socket's buffer drained below its low-water mark: write again."""

    def lost(self) -> None:
        """The peer went away (or the network did); nothing more can be written."""


class Output(Protocol):
    """Where a stream writes: a detached socket, or an adapter over ASGI `send`."""

    @property
    def paused(self) -> bool:
        """The buffer is over its high-water mark: stop producing until `Sink.writable`."""

    def write(self, data: bytes) -> None:
        """Queue bytes of the response body; never blocks."""

    def close(self) -> None:
        """End the response after everything written so far."""

    def abort(self) -> None:
        """Drop the connection now, discarding what is buffered (slow consumer)."""


Detach = Callable[[Sink, int, list[tuple[bytes, bytes]], bytes], Output | None]


def detacher(scope: Mapping[str, Any]) -> Detach | None:
    """The `detach` function the server offers for this request, if it offers one."""
    extension = (scope.get("extensions") or {}).get(EXTENSION)
    if extension is None:
        return None
    detach: Detach = extension["detach"]
    return detach


class _Detached(asyncio.Protocol):
    """A detached response: the socket's protocol from `detach` on, and its output.

    Slotted and small, because thousands of these idle for hours: uvicorn's protocol object
    (its parser, its cycle, its attribute dictionary) is dropped once the socket is handed over.
    A fan-out pass touches this object and the transport per subscriber, nothing else.
    """

    __slots__ = ("_registry", "paused", "sink", "transport")
    #: The last body chunk framed and the frame: subscribers at the same place write the same
    #: bytes object, so one framing serves all of them (a memo; it holds at most one chunk).
    _framed: tuple[bytes, bytes] = (b"", b"")

    def __init__(self, transport: Any, paused: bool, sink: Sink | None = None,
                 registry: set[Any] | None = None) -> None:
        self.transport = transport
        self.paused = paused
        self.sink = sink
        #: The server's live connections (uvicorn's `server_state.connections`): shutdown finds us there.
        self._registry = registry
        if registry is not None:
            registry.add(self)

    # -- Output ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if data and not transport.is_closing():
            body, framed = _Detached._framed
            if data is not body:
                framed = b"%x\r\n%s\r\n" % (len(data), data)
                _Detached._framed = (data, framed)
            transport.write(framed)

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(b"0\r\n\r\n")
            self.transport.close()

    def abort(self) -> None:
        self.transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        return None  # a detached stream's client has nothing more to say; anything it sends is dropped

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.sink is not None:
            self.sink.writable()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._registry is not None:
            self._registry.discard(self)
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.lost()

    def shutdown(self) -> None:
        """uvicorn's shutdown: the gateway's drain has told the stream to reconnect; what is left goes now."""
        self.transport.close()


class DirectHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that can give a response's socket to the application."""

    def on_headers_complete(self) -> None:
        pipelined = self.cycle is not None and not self.cycle.response_complete
        super().on_headers_complete()
        if not pipelined and self.scope.get("path") is not None:
            self.scope.setdefault("extensions", {})[EXTENSION] = {"detach": self.detach}

    def detach(self, sink: Sink, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> Output | None:
        """Write the response head (and `body`, the first bytes of the body, in the same write)
        and hand the connection to `sink`, out of uvicorn's hands.

        The body is sent with chunked encoding, so a client can tell a complete stream
        from a cut one. One write for the head and the first bytes is one syscall less per
        admission, which counts in a reconnect storm. Returns None when the response already started (the app must use
        `send`). The request's ASGI call should return soon after; the socket stays open.
        """
        cycle = self.cycle
        if cycle is None or cycle.response_started or self.transport.is_closing() or self.pipeline:
            return None
        head = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
        for name, value in self.server_state.default_headers + headers:
            if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
                raise RuntimeError("invalid HTTP header")  # as uvicorn's own `send` refuses it
            head += [name, b": ", value, b"\r\n"]
        head.append(b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n")
        if body:
            head.append(b"%x\r\n%s\r\n" % (len(body), body))
        cycle.response_started = cycle.response_complete = True  # uvicorn writes nothing more for it
        cycle.keep_alive = False
        self._unset_keepalive_if_required()
        transport = self.transport
        transport.write(b"".join(head))
        connections = self.server_state.connections
        output = _Detached(transport, self.flow.write_paused, sink, connections)
        connections.discard(self)
        transport.set_protocol(output)
        if self.flow.read_paused:
            transport.resume_reading()  # so that a client going away is noticed
        # This protocol object (parser, cycle, scope) is never used again on this connection.
        self.cycle = None  # type: ignore[assignment]
        self.parser = None  # type: ignore[assignment]
        return output


class _HandedOver:
    """Stands in for uvicorn's close timer once the socket is detached, so that `run_asgi`
    leaves the transport open when the application's call returns."""

    def cancel(self) -> None:
        return None


_HANDED_OVER = _HandedOver()


def ws_detacher(scope: Mapping[str, Any]) -> Callable[[WSSink, int], DetachedWebSocket | None] | None:
    """The accepted WebSocket's `detach`, when the server offers it."""
    extension = (scope.get("extensions") or {}).get(EXTENSION)
    if extension is None:
        return None
    detach: Callable[[WSSink, int], DetachedWebSocket | None] = extension["detach"]
    return detach


class DirectWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets (sans-I/O) protocol that can give an accepted socket to the application.

    uvicorn does the handshake (and every refusal before it); `detach` then makes a
    `DetachedWebSocket` the transport's protocol, and this object (the `websockets` state
    machine, the receive queue, the keepalive timers) is dropped when the ASGI call returns.
    """

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None and not self.close_sent:
            scope["extensions"][EXTENSION] = {"detach": self.detach}

    def detach(self, sink: WSSink, max_size: int) -> DetachedWebSocket | None:
        """Hand the accepted socket to `sink`; None when it cannot be handed over as it is.

        Call it right after `websocket.accept`. It refuses a socket that is closing, one
        with an extension (compression transforms frames), or one whose client already sent
        something uvicorn has parsed or buffered: the application then stays on ASGI.
        """
        conn = self.conn
        if (not self.handshake_complete or self.close_sent or self.disconnected or self.transport.is_closing()
                or conn.extensions or not self.queue.empty() or self.read_paused or self.frames
                or conn.events or conn.reader.buffer):
            return None
        self.stop_keepalive()
        socket = DetachedWebSocket(self.transport, sink, max_size, not self.writable.is_set(), self.connections)
        self.connections.discard(self)
        self.transport.set_protocol(socket)
        # uvicorn must neither write nor close anything for this socket again.
        self.close_sent = True
        self.close_timer = _HANDED_OVER  # type: ignore[assignment]
        self.conn = self.request = self.response = None  # type: ignore[assignment]
        return socket
