"""A `/ws` connection over ASGI `send` and `receive`, for servers that cannot detach the socket.

The connection writes to the same `WSChannel` seam either way; here messages collect in a
buffer that one writer task sends, the buffer reports itself paused past
`FALLBACK_HIGH_WATER` (as a socket would), and a reader task hands the client's messages
over. The server does the pings and the protocol itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from gateway.transports.ws_socket import CLOSE_TIMEOUT, WSSink
from gateway.types import Receive, Send

FALLBACK_HIGH_WATER = 1 << 16
"""Characters the fallback buffers before it reports itself paused."""


class ASGIChannel:
    """The `WSChannel` seam over ASGI: a buffer, a writer task and a reader task."""

    frames = False

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._buffer: deque[str] = deque()
        self._size = 0
        self._ready = asyncio.Event()
        self._closing: tuple[int, str] | None = None
        self._gone = False
        self._writer: asyncio.Task[None] | None = None

    @property
    def paused(self) -> bool:
        return self._size >= FALLBACK_HIGH_WATER

    def send_text(self, text: str) -> None:
        if self._closing is None and not self._gone:
            self._buffer.append(text)
            self._size += len(text)
            self._ready.set()

    def write_frames(self, data: bytes) -> None:
        raise NotImplementedError("an ASGI channel sends messages, not frames")

    def close(self, code: int, reason: str) -> None:
        if self._closing is None:
            self._closing = (code, reason)
            self._ready.set()

    def abort(self) -> None:
        self._gone = True
        self._buffer.clear()
        self._ready.set()
        writer = self._writer
        if writer is not None and writer is not asyncio.current_task():
            writer.cancel()

    def keepalive(self, now: float, interval: float, timeout: float) -> None:
        return None  # the server pings

    async def run(self, sink: WSSink) -> None:
        """Serve the connection until the client leaves or the close is sent; then tell `sink`."""
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read(sink))
        writer = self._writer = loop.create_task(self._write(sink))
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._gone = True
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            sink.lost()

    async def _read(self, sink: WSSink) -> None:
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                return
            if kind == "websocket.receive":
                text = message.get("text")
                sink.received(text if text is not None else (message.get("bytes") or b""))

    async def _write(self, sink: WSSink) -> None:
        send = self._send
        buffer = self._buffer
        with contextlib.suppress(OSError):
            while not self._gone:
                if buffer:
                    was_paused = self.paused
                    text = buffer.popleft()
                    self._size -= len(text)
                    await send({"type": "websocket.send", "text": text})
                    if was_paused and not self.paused:
                        sink.writable()
                elif self._closing is not None:
                    code, reason = self._closing
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(CLOSE_TIMEOUT):
                            await send({"type": "websocket.close", "code": code, "reason": reason})
                    return
                else:
                    self._ready.clear()
                    await self._ready.wait()
