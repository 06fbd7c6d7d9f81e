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
WebSockets: the application may write whole, ready-made frames (an event's frame is the
same bytes on every socket, so it is built once); see `transports.ws_writer`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, Protocol

from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request

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


Detach = Callable[[Sink, int, list[tuple[bytes, bytes]]], Output | None]


def detacher(scope: Mapping[str, Any]) -> Detach | None:
    """The `detach` function the server offers for this request, if it offers one."""
    extension = (scope.get("extensions") or {}).get(EXTENSION)
    if extension is None:
        return None
    detach: Detach = extension["detach"]
    return detach


class _Detached:
    """A detached response's output: its transport and write-paused flag in one small object.

    It also stands in for uvicorn's `FlowControl` (the protocol's `pause_writing` and
    `resume_writing` land here), so a fan-out pass touches this object and the transport
    per subscriber, not the protocol's attribute dictionary.
    """

    __slots__ = ("paused", "transport")
    #: The last body chunk framed and the frame: subscribers at the same place write the same
    #: bytes object, so one framing serves all of them (a memo; it holds at most one chunk).
    _framed: tuple[bytes, bytes] = (b"", b"")

    def __init__(self, transport: Any, paused: bool) -> None:
        self.transport = transport
        self.paused = paused

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

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


class DirectHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that can give a response's socket to the application."""

    _sink: Sink | None = None

    def on_headers_complete(self) -> None:
        pipelined = self.cycle is not None and not self.cycle.response_complete
        super().on_headers_complete()
        if not pipelined and self.scope.get("path") is not None:
            self.scope.setdefault("extensions", {})[EXTENSION] = {"detach": self.detach}

    def detach(self, sink: Sink, status: int, headers: list[tuple[bytes, bytes]]) -> Output | None:
        """Write the response head and take the connection out of the ASGI cycle.

        The body is sent with chunked encoding, so a client can tell a complete stream
        from a cut one. Returns None when the response already started (the app must use
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
        cycle.response_started = cycle.response_complete = True  # uvicorn writes nothing more for it
        cycle.keep_alive = False
        self._unset_keepalive_if_required()
        self.transport.write(b"".join(head))
        self._sink = sink
        # Free the per-request state now (a stream lives for hours): what parses, pipelines and
        # awaits requests is never used again on this connection.
        self.cycle = None  # type: ignore[assignment]
        self.scope = None  # type: ignore[assignment]
        self.headers = None  # type: ignore[assignment]
        self.parser = None  # type: ignore[assignment]
        self.pipeline = None  # type: ignore[assignment]
        output = _Detached(self.transport, self.flow.write_paused)
        self.flow = output  # type: ignore[assignment]
        self.server = self.client = None
        return output

    # --- the transport's callbacks -------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._sink is None:
            super().data_received(data)
        # A detached stream's client has nothing more to say; anything it sends is dropped.

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._sink is not None:
            self._sink.writable()

    def connection_lost(self, exc: Exception | None) -> None:
        sink = self._sink
        super().connection_lost(exc)
        if sink is not None:
            self._sink = None
            sink.lost()

    def shutdown(self) -> None:
        if self._sink is not None:
            # The gateway's drain has told the stream to reconnect; whatever is left goes now.
            self.transport.close()
            return
        super().shutdown()



class FrameOutput(Protocol):
    """Whole WebSocket frames written straight to an accepted socket."""

    @property
    def paused(self) -> bool:
        """The socket's buffer is over its high-water mark."""

    def write_frames(self, data: bytes) -> bool:
        """Write complete frames; False once the socket is closing (nothing was written)."""

    async def drained(self) -> None:
        """Wait until the buffer is below its low-water mark (or the socket is gone)."""

    def on_writable(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time a full buffer drains below its low-water mark."""


def frame_output(scope: Mapping[str, Any]) -> FrameOutput | None:
    """The socket itself, when the server offers it and no extension (compression) transforms frames."""
    extension = (scope.get("extensions") or {}).get(EXTENSION)
    if extension is None:
        return None
    output: DirectWebSocketProtocol = extension["frames"]
    return output if output.frames_untransformed else None


class DirectWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets (sans-I/O) protocol that lets the application write whole frames.

    Safe to interleave with uvicorn's own writes (pings, pongs, the close) because both only
    ever write complete frames and the gateway never fragments a message.
    """

    _writable_callback: Callable[[], None] | None = None
    #: The transport's buffer is over its high-water mark (a plain attribute: the fan-out pass
    #: reads it for every socket; uvicorn's own `writable` event stays as it was).
    paused = False

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None and not self.close_sent:
            scope["extensions"][EXTENSION] = {"frames": self}

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # The handshake's request and response (headers and all) are never read again.
            self.request = self.response = None  # type: ignore[assignment]

    @property
    def frames_untransformed(self) -> bool:
        return not self.conn.extensions

    def write_frames(self, data: bytes) -> bool:
        if not self.handshake_complete or self.close_sent or self.disconnected or self.transport.is_closing():
            return False
        self.transport.write(data)
        return True

    async def drained(self) -> None:
        await self.writable.wait()

    def on_writable(self, callback: Callable[[], None]) -> None:
        self._writable_callback = callback

    def pause_writing(self) -> None:
        super().pause_writing()
        self.paused = True

    def resume_writing(self) -> None:
        super().resume_writing()
        self.paused = False
        if self._writable_callback is not None:
            self._writable_callback()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.paused = False  # as uvicorn sets `writable`: nothing will drain now, and nobody should wait
