"""WebSocket test clients for the gateway's `/ws`: a real `websockets` client that records every message,
and a raw-socket client with a tiny receive buffer that can stop reading (a stuck browser)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from gateway.app import create_app
from tests.conftest import Gateway, gateway_config
from tests.servers import serve_gateway, wait_for

Message = dict[str, Any]


def ws_url(gateway: Gateway) -> str:
    return gateway.url.replace("http://", "ws://", 1) + "/ws"


def protocols(token: str) -> list[Subprotocol]:
    """What a browser passes: `new WebSocket(url, ["gateway.v1", "bearer." + token])`."""
    return [Subprotocol("gateway.v1"), Subprotocol(f"bearer.{token}")]


@dataclass
class Client:
    """A connected `websockets` client whose messages a background task records as they arrive."""

    ws: ClientConnection
    messages: list[Message] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def _pump(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.ws:
                self.messages.append(json.loads(raw))

    async def send(self, **message: Any) -> None:
        await self.ws.send(json.dumps(message))

    async def subscribe(self, stream: str, **extra: Any) -> None:
        await self.send(type="subscribe", stream=stream, **extra)

    @property
    def closed(self) -> bool:
        return self.task is not None and self.task.done()

    @property
    def close_code(self) -> int | None:
        return self.ws.close_code

    def of_type(self, kind: str, stream: str | None = None) -> list[Message]:
        return [m for m in self.messages if m["type"] == kind and (stream is None or m.get("stream") == stream)]

    def events(self, stream: str) -> list[Message]:
        return [m["event"] for m in self.of_type("event", stream)]

    def ids(self, stream: str) -> list[Any]:
        return [e["id"] for e in self.events(stream)]

    def errors(self, stream: str | None = None) -> list[str]:
        return [m["error"]["code"] for m in self.of_type("error", stream)]

    def ended(self, stream: str) -> bool:
        return bool(self.of_type("unsubscribed", stream))

    async def until(self, predicate: Callable[[Client], bool], timeout: float = 10.0, what: str = "messages") -> None:
        await wait_for(lambda: predicate(self), timeout=timeout, message=what)

    async def until_closed(self, timeout: float = 10.0) -> int | None:
        await wait_for(lambda: self.closed, timeout=timeout, message="socket closed")
        return self.close_code


@contextlib.asynccontextmanager
async def ws_client(gateway: Gateway, sub: str = "alice", *, token: str | None = None,
                    streams: list[str] | None = None, subprotocols: list[Subprotocol] | None = None,
                    **kwargs: Any) -> AsyncIterator[Client]:
    """A real browser-like client: the token rides in Sec-WebSocket-Protocol next to `gateway.v1`."""
    token = token if token is not None else gateway.token(sub, streams=streams)
    offered = protocols(token) if subprotocols is None else subprotocols
    async with recording_client(ws_url(gateway), offered, **kwargs) as client:
        yield client


@contextlib.asynccontextmanager
async def recording_client(url: str, subprotocols: list[Subprotocol], **kwargs: Any) -> AsyncIterator[Client]:
    """Connect to `url` and record every message the server sends until the block ends."""
    async with connect(url, subprotocols=subprotocols or None, open_timeout=5, close_timeout=2, **kwargs) as ws:
        client = Client(ws)
        client.task = asyncio.create_task(client._pump())
        try:
            yield client
        finally:
            client.task.cancel()
            await asyncio.gather(client.task, return_exceptions=True)


class RawClient:
    """A WebSocket client over a raw socket with a tiny receive buffer; it reads only when told to.

    Stands in for a browser tab that stopped reading: the gateway's writes back up after a few
    kilobytes instead of disappearing into a client library's buffers.
    """

    def __init__(self, url: str, token: str, receive_buffer: int = 4096) -> None:
        self.url = url
        self.token = token
        self.receive_buffer = receive_buffer
        self.protocol = ClientProtocol(parse_uri(url), subprotocols=protocols(token), max_size=None)
        self.sock: socket.socket | None = None
        self.messages: list[Message] = []
        #: Every other frame received (pings, pongs, binary), in order.
        self.control: list[Frame] = []

    async def __aenter__(self) -> RawClient:
        loop = asyncio.get_running_loop()
        parts = urlsplit(self.url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.setblocking(False)
        self.sock = sock
        await loop.sock_connect(sock, (parts.hostname or "127.0.0.1", parts.port or 80))
        self.protocol.send_request(self.protocol.connect())
        await self.flush()
        while self.protocol.state is State.CONNECTING:
            await self._receive_some(5.0)
        if self.protocol.state is not State.OPEN:
            raise RuntimeError(f"handshake failed: {self.protocol.handshake_exc!r}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.sock is not None:
            self.sock.close()

    async def flush(self) -> None:
        assert self.sock is not None
        data = b"".join(self.protocol.data_to_send())
        if data:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _receive_some(self, timeout: float) -> bool:
        """Read once; False at end of stream."""
        assert self.sock is not None
        async with asyncio.timeout(timeout):
            data = await asyncio.get_running_loop().sock_recv(self.sock, 1 << 16)
        if data:
            self.protocol.receive_data(data)
        else:
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self.messages.append(json.loads(bytes(event.data)))
            elif isinstance(event, Frame):
                self.control.append(event)
        return bool(data)

    async def send(self, **message: Any) -> None:
        self.protocol.send_text(json.dumps(message).encode())
        await self.flush()

    async def read_until_closed(self, timeout: float = 10.0) -> int | None:
        """Read everything the gateway sent until its close frame (or EOF); the close code, if any."""
        async with asyncio.timeout(timeout):
            while self.protocol.close_rcvd is None and await self._receive_some(timeout):
                pass
        return self.protocol.close_rcvd.code if self.protocol.close_rcvd is not None else None


@contextlib.asynccontextmanager
async def gateway_with_small_send_buffers(sim_url: str, send_buffer: int = 8192, direct: bool = True,
                                          **overrides: Any) -> AsyncIterator[Gateway]:
    """A gateway whose accepted sockets have a small, fixed kernel send buffer.

    Linux otherwise grows a loopback socket's send buffer to megabytes, so a client that stops
    reading would take minutes of events to back up; accepted sockets inherit the listener's size.
    """
    config = gateway_config(sim_url, **overrides)
    app = create_app(config, registry=CollectorRegistry())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(("127.0.0.1", 0))
    try:
        async with serve_gateway(app, config, sock, direct=direct) as url:
            yield Gateway(url, app, config)
    finally:
        sock.close()
