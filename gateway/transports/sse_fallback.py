"""SSE over ASGI `send`, for servers that do not offer the `gateway.direct` extension.

The stream writes to the same `Output` seam either way; here the writes collect in a buffer
that one loop in the request's task sends, and the buffer reports itself paused past
`FALLBACK_HIGH_WATER`, as a socket would.
"""

from __future__ import annotations

import asyncio
import contextlib

from gateway.transports.direct import Sink
from gateway.types import Receive, Send

#: Bytes the fallback buffers before it reports itself paused (the socket's own limit, for direct output).
FALLBACK_HIGH_WATER = 1 << 16


class SendOutput:
    """The `Output` seam over ASGI `send`, for servers that do not offer `gateway.direct`.

    Writes collect in a buffer that one loop in the request's task sends; the buffer
    reports itself paused past `FALLBACK_HIGH_WATER`, as a socket would.
    """

    def __init__(self, sink: Sink, send: Send, receive: Receive) -> None:
        self._sink = sink
        self._send = send
        self._receive = receive
        self._buffer: list[bytes] = []
        self._size = 0
        self._ready = asyncio.Event()
        self._closing = False
        self._gone = False
        self._task: asyncio.Task[object] | None = None

    @property
    def paused(self) -> bool:
        return self._size >= FALLBACK_HIGH_WATER

    def write(self, data: bytes) -> None:
        if data and not self._closing:
            self._buffer.append(data)
            self._size += len(data)
            self._ready.set()

    def close(self) -> None:
        self._closing = True
        self._ready.set()

    def abort(self) -> None:
        self._gone = True
        self._ready.set()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    async def run(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Send the head, then whatever is written, until the stream closes or the client leaves."""
        task = self._task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.get_running_loop().create_task(self._watch())
        try:
            await self._send({"type": "http.response.start", "status": 200, "headers": headers})
            while not self._gone:
                if self._buffer:
                    was_paused = self.paused
                    body = b"".join(self._buffer)
                    self._buffer.clear()
                    self._size = 0
                    await self._send({"type": "http.response.body", "body": body, "more_body": True})
                    if was_paused:
                        self._sink.writable()
                elif self._closing:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(1.0):
                            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                else:
                    await self._ready.wait()
                    self._ready.clear()
        except asyncio.CancelledError:
            if not self._gone:
                raise
            task.uncancel()
        finally:
            watcher.cancel()

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._gone = True
                self._ready.set()
                self._sink.lost()
                return
