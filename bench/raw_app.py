"""A reference ceiling for Python: raw uvloop protocols, no ASGI, no framework, no auth.

One upstream SSE connection per evaluation (raw socket, `Last-Event-ID` not needed here);
every upstream read is cut at its last complete event, wrapped in one HTTP chunk, and the
same bytes are written straight to every subscriber's transport, from the read callback.
No task, no queue and no future per subscriber. It is what the gateway's hot path would cost
without ASGI in the way; it is not a product (no auth, no limits, no slow-consumer policy).

`python -m bench.raw_app --port P --upstream http://127.0.0.1:U --api-key KEY`
"""

from __future__ import annotations

import argparse
import asyncio
import re
from urllib.parse import urlsplit

from bench.chunked import Dechunker

_PATH = re.compile(rb"GET /api/v1/evaluations/([A-Za-z0-9._:-]+)/stream ")
_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\n"
         b"transfer-encoding: chunked\r\n\r\n")


class Feed(asyncio.Protocol):
    """The one upstream stream of an evaluation; fans every read out to its subscribers."""

    def __init__(self, subscribers: set[asyncio.Transport]) -> None:
        self.subscribers = subscribers
        self.head_done = False
        self.pending = b""
        self.dechunker = Dechunker()

    def data_received(self, data: bytes) -> None:
        if not self.head_done:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_done = True
            data = data[end + 4:]
        body = self.pending + self.dechunker.feed(data)
        end = body.rfind(b"\n\n")
        if end < 0:
            self.pending = body
            return
        self.pending = body[end + 2:]
        frames = body[:end + 2]
        out = b"%x\r\n%s\r\n" % (len(frames), frames)
        for transport in self.subscribers:
            transport.write(out)


class Subscriber(asyncio.Protocol):
    def __init__(self, app: RawApp) -> None:
        self.app = app
        self.transport: asyncio.Transport
        self.evaluation: str | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self.evaluation is not None:
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        match = _PATH.match(self.buffer)
        if match is None:
            self.transport.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()
            return
        self.evaluation = match.group(1).decode()
        self.transport.write(_HEAD + b"d\r\nretry: 1000\n\n\r\n")
        self.app.join(self.evaluation, self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.evaluation is not None:
            self.app.subscribers[self.evaluation].discard(self.transport)


class RawApp:
    def __init__(self, upstream: str, api_key: str) -> None:
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.api_key = api_key
        self.subscribers: dict[str, set[asyncio.Transport]] = {}

    def join(self, evaluation: str, transport: asyncio.Transport) -> None:
        subscribers = self.subscribers.get(evaluation)
        if subscribers is None:
            subscribers = self.subscribers[evaluation] = set()
            asyncio.get_running_loop().create_task(self._open(evaluation, subscribers))
        subscribers.add(transport)

    async def _open(self, evaluation: str, subscribers: set[asyncio.Transport]) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(lambda: Feed(subscribers), self.host, self.port)
        transport.write(f"GET /api/v1/evaluations/{evaluation}/stream HTTP/1.1\r\nhost: upstream\r\n"
                        f"accept: text/event-stream\r\nx-api-key: {self.api_key}\r\n\r\n".encode())


async def serve(host: str, port: int, upstream: str, api_key: str) -> None:
    app = RawApp(upstream, api_key)
    server = await asyncio.get_running_loop().create_server(lambda: Subscriber(app), host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="raw uvloop fan-out (a reference ceiling, not a product)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--api-key", required=True)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.host, args.port, args.upstream, args.api_key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
