"""A scripted, misbehaving upstream for tests: every resource id picks one way to break the rules.

Served by uvicorn on a loopback port like the simulator. It records every request it sees
(path and headers) so tests can check where the API key went, and counts bytes sent.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from gateway.types import Receive, Scope, Send

EVENT_STREAM = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


@dataclass
class HostileUpstream:
    """`/api/v1/evaluations/<behaviour>/stream`, polls of `/api/v1/evaluations/<behaviour>` and `/ws/optimization`.

    `redirect_to` is where redirects point (another server, which must never see the API key).
    """

    redirect_to: str = "http://127.0.0.1:9/steal"
    #: Answer the job WebSocket's upgrade with a redirect to `redirect_to`.
    ws_redirect: bool = False
    seen: list[Seen] = field(default_factory=list)
    bytes_sent: int = 0
    connections: dict[str, int] = field(default_factory=dict)
    #: Set while an endless line is being written; tests wait on it.
    endless_started: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        path: str = scope["path"]
        self.seen.append(Seen(path, headers))
        self.connections[path] = self.connections.get(path, 0) + 1
        if scope["type"] == "websocket":
            await self._websocket(receive, send)
            return
        parts = path.strip("/").split("/")
        behaviour = parts[3] if len(parts) >= 4 else ""
        if parts[-1] == "stream":
            await self._stream(behaviour, receive, send)
        else:
            await self._poll(behaviour, send)

    async def _stream(self, behaviour: str, receive: Receive, send: Send) -> None:
        if behaviour.startswith("redirect"):
            await _respond(send, 302, b"", [(b"location", self.redirect_to.encode())])
            return
        if not behaviour.startswith(("endless", "nan")):
            await _respond(send, 404, b'{"error": {"code": "not_found", "message": "no such evaluation"}}')
            return
        await send({"type": "http.response.start", "status": 200, "headers": EVENT_STREAM})
        if behaviour.startswith("endless"):
            # One `data:` line that never ends, 64 KiB at a time, until the client goes away.
            await self._body(send, b"id: 1\ndata: ")
            chunk = b"x" * 65536
            self.endless_started.set()
            gone = asyncio.ensure_future(receive())  # http.disconnect once the client hangs up
            try:
                while self.bytes_sent < 256 << 20 and not gone.done():
                    await self._body(send, chunk)
            finally:
                gone.cancel()
            return
        if behaviour.startswith("nan"):
            await self._body(send, b'id: 1\nevent: progress\ndata: {"score": NaN, "best": Infinity, "n": 1}\n\n')
            await self._body(send, b'id: 2\nevent: final\ndata: {"result": {"accuracy": -Infinity}}\n\n')
            await send({"type": "http.response.body", "body": b""})

    async def _body(self, send: Send, data: bytes) -> None:
        self.bytes_sent += len(data)
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _poll(self, behaviour: str, send: Send) -> None:
        if behaviour.startswith("redirect"):
            await _respond(send, 302, b"", [(b"location", self.redirect_to.encode())])
        elif behaviour.startswith("nan"):
            await _respond(send, 200, b'{"id": "nan", "accuracy": NaN, "status": "success"}')
        elif behaviour.startswith("huge"):
            await _respond(send, 200, b'{"id": "huge", "blob": "' + b"x" * (5 << 20) + b'"}')
        elif behaviour.startswith("text"):
            await _respond(send, 200, b"this is not json")
        else:
            await _respond(send, 404, b'{"error": {"code": "not_found", "message": "no such thing"}}')

    async def _websocket(self, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        if self.ws_redirect:
            await send({"type": "websocket.http.response.start", "status": 302,
                        "headers": [(b"location", self.redirect_to.encode()), (b"content-length", b"0")]})
            await send({"type": "websocket.http.response.body", "body": b""})
            return
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            request: dict[str, Any] = json.loads(message.get("text") or "{}")
            job = request.get("jobId")
            if request.get("type") != "subscribe":
                continue
            await send({"type": "websocket.send", "text": json.dumps({"type": "subscribed", "jobId": job})})
            if str(job).startswith("huge"):
                blob = "x" * (2 << 20)
                event = {"id": 1, "eventType": "job_started", "iteration": None, "timestamp": "t", "data": {"b": blob}}
                await send({"type": "websocket.send", "text": json.dumps({"type": "event", "jobId": job,
                                                                          "event": event})})
            elif str(job).startswith("nan"):
                await send({"type": "websocket.send", "text": '{"type":"event","jobId":"' + str(job) + '","event":'
                            '{"id":1,"eventType":"evaluation_complete","iteration":1,"timestamp":"t",'
                            '"data":{"score":NaN}}}'})


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Recorder:
    """A server that records whoever calls it (the target of a redirect)."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        self.seen.append(Seen(scope["path"], headers))
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1000})
            return
        await _respond(send, 200, b"{}")
