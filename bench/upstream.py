"""A minimal benchmark upstream and publisher, on raw asyncio protocols (uvloop when installed).

One process plays two parts:

* the upstream: `GET /api/v1/evaluations/{id}/stream` with `X-API-Key` answers
  `text/event-stream` (chunked) with integer `id:` lines, honours `Last-Event-ID`, and counts
  connections per evaluation (the gateway must open exactly one);
* the publisher: on a control socket it takes a JSON command `{"cmd": "run", ...}` and publishes
  numbered ~90-byte payloads carrying their send time (`bench.payload`), either closed-loop
  (message k goes out once every subscriber has message k-W: load generators report their
  progress as `A <run> <worker> <seq>` lines on the same socket) or at a fixed rate. The sink is
  this process's own upstream streams, or an nchan publisher location (HTTP POST per message).

Run standalone: `python -m bench.upstream --port 0 --control-port 0 --api-key KEY` prints
`READY <port> <control-port>`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from collections import Counter, deque
from typing import Any

from bench.payload import make_payload

_STREAM_PATH = re.compile(rb"/api/v1/evaluations/([A-Za-z0-9._:-]+)/stream")
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")
HISTORY = 4096
EVENT_NAME = b"progress"


def sse_frame(seq: int, payload: bytes) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, EVENT_NAME, payload)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Streams:
    """Open upstream SSE connections and the retained frames of each evaluation."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key.encode()
        self.open: dict[str, set[UpstreamConnection]] = {}
        self.opened: Counter[str] = Counter()
        self.history: dict[str, deque[tuple[int, bytes]]] = {}

    def publish(self, stream: str, frames: list[tuple[int, bytes]]) -> None:
        history = self.history.setdefault(stream, deque(maxlen=HISTORY))
        history.extend(frames)
        conns = self.open.get(stream)
        if conns:
            data = chunk(b"".join(frame for _, frame in frames))
            for conn in conns:
                conn.transport.write(data)


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 request: the SSE stream for one evaluation (or an error answer)."""

    def __init__(self, streams: Streams) -> None:
        self.streams = streams
        self.buffer = b""
        self.stream: str | None = None
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self.stream is not None:
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > 65536:
                self.transport.close()
            return
        head = self.buffer[:end].split(b"\r\n")
        self.buffer = b""
        parts = head[0].split(b" ")
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        match = _STREAM_PATH.fullmatch(parts[1].split(b"?")[0]) if len(parts) == 3 else None
        if parts[0] != b"GET" or match is None:
            self._answer(b"404 Not Found")
            return
        if headers.get(b"x-api-key") != self.streams.api_key:
            self._answer(b"401 Unauthorized")
            return
        stream = match.group(1).decode()
        self.stream = stream
        self.streams.opened[stream] += 1
        self.streams.open.setdefault(stream, set()).add(self)
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + chunk(b"retry: 1000\n\n"))
        last = headers.get(b"last-event-id")
        history = self.streams.history.get(stream)
        if history:
            after = int(last) if last and last.isdigit() else 0
            frames = [frame for seq, frame in history if seq > after]
            if frames:
                self.transport.write(chunk(b"".join(frames)))

    def _answer(self, status: bytes) -> None:
        self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream is not None:
            self.streams.open.get(self.stream, set()).discard(self)


class NchanSink(asyncio.Protocol):
    """Publishes by HTTP POST to an nchan publisher location, pipelined on one keep-alive connection."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport
        self.statuses: Counter[str] = Counter()
        self.tail = b""
        self.lost = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, host: str, port: int) -> NchanSink:
        loop = asyncio.get_running_loop()
        _, sink = await loop.create_connection(cls, host, port)
        return sink

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        data = self.tail + data
        for status in _STATUS.findall(data):
            self.statuses[status.decode()] += 1
        self.tail = data[-16:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def post(self, path: bytes, bodies: list[bytes]) -> None:
        self.transport.write(b"".join(
            b"POST %s HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (path, len(body), body) for body in bodies))


class Publisher:
    """Runs one publication at a time, closed-loop or at a fixed rate, to one stream."""

    def __init__(self, streams: Streams) -> None:
        self.streams = streams
        self.run_id = ""
        self.acks: dict[str, int] = {}
        self.workers = 0
        self.window = 16
        self.published = 0
        self.limit = 0
        self.deadline = 0.0
        self.closed_loop = False
        self.done = asyncio.Event()
        self.first_ns = 0
        self.last_pub_ns = 0
        self.done_ns = 0
        self._emit: Any = None
        self.stopped = False

    def ack(self, run_id: str, worker: str, seq: int) -> None:
        if run_id != self.run_id:
            return
        if seq > self.acks.get(worker, 0):
            self.acks[worker] = seq
        self._progress()

    def _floor(self) -> int:
        if len(self.acks) < self.workers:
            return 0
        return min(self.acks.values())

    def _progress(self) -> None:
        floor = self._floor()
        if self.stopped and floor >= self.published and not self.done.is_set():
            self.done_ns = time.time_ns()
            self.done.set()
            return
        if self.closed_loop and not self.stopped:
            target = min(self.limit, floor + self.window)
            if time.monotonic() >= self.deadline:
                target = min(target, self.published)
                self._stop()
            if target > self.published:
                self._publish(target - self.published)
            if self.published >= self.limit:
                self._stop()
            if self.stopped:
                self._progress()

    def _stop(self) -> None:
        self.stopped = True

    def _publish(self, count: int) -> None:
        now = time.time_ns()
        if not self.first_ns:
            self.first_ns = now
        self.last_pub_ns = now
        start = self.published + 1
        self.published += count
        self._emit([(seq, make_payload(seq, now)) for seq in range(start, start + count)])

    async def run(self, cmd: dict[str, Any]) -> dict[str, Any]:
        stream = cmd["stream"]
        self.run_id = str(cmd["run"])
        self.acks = {}
        self.workers = int(cmd["workers"])
        self.window = int(cmd.get("window", 16))
        self.limit = int(cmd.get("count", 10**9))
        duration = float(cmd.get("duration", 3600.0))
        self.published = 0
        self.first_ns = self.last_pub_ns = self.done_ns = 0
        self.done = asyncio.Event()
        self.stopped = False
        self.closed_loop = cmd["mode"] == "closed"
        sink: NchanSink | None = None
        if cmd.get("sink") == "nchan":
            sink = await NchanSink.open(cmd["nchan_host"], int(cmd["nchan_port"]))
            path = f"/pub/{stream}".encode()
            self._emit = lambda batch: sink.post(path, [payload for _, payload in batch])
        else:
            self._emit = lambda batch: self.streams.publish(
                stream, [(seq, sse_frame(seq, payload)) for seq, payload in batch])
        started = time.monotonic()
        self.deadline = started + duration
        try:
            if self.closed_loop:
                self._progress()
            else:
                await self._paced(float(cmd["rate"]), started)
            drain = float(cmd.get("drain_timeout", 30.0))
            timed_out = False
            try:
                await asyncio.wait_for(self.done.wait(), max(drain, self.deadline - time.monotonic() + drain))
            except TimeoutError:
                timed_out = True
            result = {
                "published": self.published, "first_ns": self.first_ns, "last_pub_ns": self.last_pub_ns,
                "done_ns": self.done_ns, "timed_out": timed_out, "acks": dict(self.acks),
            }
            if sink is not None:
                await asyncio.sleep(0.05)
                result["publish_statuses"] = dict(sink.statuses)
            return result
        finally:
            self.run_id = ""
            if sink is not None:
                sink.transport.close()

    async def _paced(self, rate: float, started: float) -> None:
        """Publish `rate` messages per second until the count or the duration is reached."""
        tick = min(0.002, 1.0 / rate)
        while not self.stopped:
            now = time.monotonic()
            due = min(self.limit, int((now - started) * rate) + 1)
            if now >= self.deadline:
                due = min(due, self.published)
                self._stop()
            if due > self.published:
                self._publish(due - self.published)
            if self.published >= self.limit:
                self._stop()
            if self.stopped:
                break
            next_at = started + self.published / rate
            await asyncio.sleep(max(tick / 2, next_at - time.monotonic()))
        self._progress()


class Control(asyncio.Protocol):
    """Line protocol: `A <run> <worker> <seq>` progress reports, or one JSON command per line."""

    def __init__(self, publisher: Publisher, streams: Streams) -> None:
        self.publisher = publisher
        self.streams = streams
        self.buffer = b""
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        latest: dict[tuple[bytes, bytes], int] = {}
        for line in lines:
            if line.startswith(b"A "):
                _, run_id, worker, seq = line.split()
                latest[(run_id, worker)] = int(seq)
            elif line.startswith(b"{"):
                asyncio.get_running_loop().create_task(self._command(json.loads(line)))
        for (run_id, worker), seq in latest.items():
            self.publisher.ack(run_id.decode(), worker.decode(), seq)

    async def _command(self, cmd: dict[str, Any]) -> None:
        name = cmd.get("cmd")
        reply: dict[str, Any]
        try:
            if name == "run":
                reply = await self.publisher.run(cmd)
            elif name == "stats":
                stream = cmd["stream"]
                reply = {"opened": self.streams.opened[stream], "open": len(self.streams.open.get(stream, ()))}
            elif name == "ping":
                reply = {"pong": True}
            else:
                reply = {"error": f"unknown command {name!r}"}
        except Exception as exc:  # reported to the orchestrator, which fails the run
            reply = {"error": repr(exc)}
        with contextlib.suppress(Exception):
            self.transport.write(json.dumps(reply).encode() + b"\n")


async def serve(host: str, port: int, control_port: int, api_key: str) -> None:
    loop = asyncio.get_running_loop()
    streams = Streams(api_key)
    publisher = Publisher(streams)
    upstream = await loop.create_server(lambda: UpstreamConnection(streams), host, port, backlog=1024)
    control = await loop.create_server(lambda: Control(publisher, streams), host, control_port)
    print("READY", upstream.sockets[0].getsockname()[1], control.sockets[0].getsockname()[1], flush=True)
    await asyncio.Future()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--control-port", type=int, default=0)
    parser.add_argument("--api-key", required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.host, args.port, args.control_port, args.api_key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
