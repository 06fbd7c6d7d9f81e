"""What a `/ws` connection writes to and hears from: the `WSChannel` seam and the detached socket.

An accepted WebSocket kept inside uvicorn's protocol costs a task for the ASGI call, the
protocol's receive queue, events and keepalive timers, and the `websockets` state machine:
about 29 KB per idle socket, six times an SSE stream. Once the handshake is done the
gateway asks for the socket itself (`DirectWebSocketProtocol.detach`, the `gateway.direct`
extension) and speaks RFC 6455 on it with `codec.ws_frames`: `DetachedWebSocket` is the
socket's asyncio protocol from then on, a few slots and a frame parser. It answers pings and
the closing handshake itself and hands complete messages to its `WSSink` (the connection).

Servers without the extension serve the same connection through ASGI `send`/`receive`
(`transports.ws_fallback.ASGIChannel`); the connection only sees a `WSChannel`.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Protocol

from gateway.codec.ws_frames import (
    FrameError,
    FrameParser,
    close_frame,
    ping_frame,
    pong_frame,
    text_frame,
)

CLOSE_TIMEOUT = 5.0
"""Seconds a close may wait for the client's answer (or behind unsent data) before the socket is dropped."""
SERVICE_RESTART = 1012


class WSSink(Protocol):
    """The owner of a channel (`ws_connection.WSConnection`)."""

    def received(self, data: str | bytes) -> None:
        """One complete message from the client."""

    def broken(self, code: int, reason: str) -> None:
        """The client broke the protocol (or sent a message over the limit): close with `code`."""

    def writable(self) -> None:
        """A full buffer drained below its low-water mark: write again."""

    def lost(self) -> None:
        """The connection is gone; nothing more can be written or heard."""


class WSChannel(Protocol):
    """An accepted WebSocket as its connection sees it. Every call returns at once."""

    #: `write_frames` takes the hub's ready-made frames (`Event.ws_frame`, joined once for all sockets).
    frames: bool

    @property
    def paused(self) -> bool:
        """The buffer is over its high-water mark: stop producing until `WSSink.writable`."""

    def send_text(self, text: str) -> None:
        """Queue one text message."""

    def write_frames(self, data: bytes) -> None:
        """Queue complete, ready-made frames (only when `frames`)."""

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake after what is queued; the channel drops the socket if it stalls."""

    def abort(self) -> None:
        """Drop the connection now, discarding what is buffered."""

    def keepalive(self, now: float, interval: float, timeout: float) -> None:
        """Ping a client silent for `interval`; drop one that then stays silent for `timeout`.

        `now` is `time.monotonic()`. Channels whose server pings for them do nothing.
        """


class _Registry(Protocol):
    def add(self, item: Any) -> None: ...

    def discard(self, item: Any) -> None: ...


class DetachedWebSocket(asyncio.Protocol):
    """An accepted WebSocket served by the gateway itself: the transport's protocol after `detach`.

    Slotted and task-free, because thousands of these idle for hours. Client messages reach
    the sink as they complete; pings are answered here; a close from the client is echoed
    and the socket closed; a protocol error closes with the parser's code.
    """

    __slots__ = ("_close_timer", "_registry", "heard", "parser", "paused", "pinged", "sending_close", "sink",
                 "transport")

    frames = True

    def __init__(self, transport: asyncio.Transport, sink: WSSink, max_size: int, paused: bool,
                 registry: _Registry) -> None:
        self.transport = transport
        self.sink = sink
        self.parser: FrameParser | None = FrameParser(max_size)
        self.paused = paused
        #: When the client was last heard from (`time.monotonic()`), and when an unanswered ping went out.
        self.heard = time.monotonic()
        self.pinged = 0.0
        #: Our close frame is written: nothing else may follow it.
        self.sending_close = False
        self._close_timer: asyncio.TimerHandle | None = None
        #: The server's live connections (uvicorn's `server_state.connections`): shutdown finds us there.
        self._registry = registry
        registry.add(self)

    # -- WSChannel ---------------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        if not self.sending_close:
            self.transport.write(text_frame(text.encode()))

    def write_frames(self, data: bytes) -> None:
        if not self.sending_close:
            self.transport.write(data)

    def close(self, code: int, reason: str) -> None:
        if self.sending_close:
            return
        self.sending_close = True
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(close_frame(code, reason))
        self._close_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    def abort(self) -> None:
        self.sending_close = True
        self.transport.abort()

    def keepalive(self, now: float, interval: float, timeout: float) -> None:
        if self.sending_close or self.parser is None:
            return
        if self.pinged:
            if now - self.pinged >= timeout:
                self.transport.write(close_frame(1011, "keepalive ping timeout"))
                self.sending_close = True
                self.transport.close()
        elif now - self.heard >= interval:
            self.pinged = now
            self.transport.write(ping_frame(os.urandom(4)))

    # -- asyncio.Protocol --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            return
        self.heard = time.monotonic()
        self.pinged = 0.0  # any sign of life answers the keepalive
        try:
            messages = parser.feed(data)
        except FrameError as exc:
            self.parser = None
            self.sink.broken(exc.code, exc.reason)
            self.close(exc.code, exc.reason)
            return
        for message in messages:
            kind = message.kind
            if kind == "text" or kind == "binary":
                if not self.sending_close:
                    self.sink.received(message.data)
            elif kind == "ping":
                # Not while the socket is full: a client that pings without reading must not grow the buffer.
                if not self.sending_close and not self.paused:
                    self.transport.write(pong_frame(message.data))  # type: ignore[arg-type]
            elif kind == "close":
                self.parser = None
                if not self.sending_close:  # the client starts the closing handshake: echo its code
                    self.sending_close = True
                    self.transport.write(close_frame(message.code) if message.code != 1005 else close_frame(None))
                self.transport.close()
                return

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.sink.writable()

    def connection_lost(self, exc: Exception | None) -> None:
        self.parser = None
        self.sending_close = True
        self.paused = False
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._registry.discard(self)
        self.sink.lost()

    def shutdown(self) -> None:
        """uvicorn's shutdown: the gateway's drain normally closed this socket already."""
        if not self.sending_close and not self.transport.is_closing():
            self.sending_close = True
            self.transport.write(close_frame(SERVICE_RESTART))
        self.transport.close()
