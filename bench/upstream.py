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
* the pacer (reconnect storm and soak, `Pacer`): many evaluations at once, each published at
  its own steady rate from a given history onwards (`begin`), and ended with a terminal
  `final` event on command (`end`), after which the upstream closes their streams as the
  real one does.

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
FINAL_EVENT = b"final"
#: How long an ended evaluation's history is kept for late readers (then forgotten: bounded memory).
ENDED_KEEP_S = 60.0
_END_OF_BODY = b"0\r\n\r\n"


def sse_frame(seq: int, payload: bytes, event: bytes = EVENT_NAME) -> bytes:
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (seq, event, payload)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Streams:
    """Open upstream SSE connections and the retained frames of each evaluation."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key.encode()
        self.open: dict[str, set[UpstreamConnection]] = {}
        self.opened: Counter[str] = Counter()
        self.history: dict[str, deque[tuple[int, bytes]]] = {}
        #: Evaluations that sent their terminal event: readers get the history, then the end of the body.
        self.ended: set[str] = set()

    def publish(self, stream: str, frames: list[tuple[int, bytes]]) -> None:
        if stream in self.ended:
            return
        history = self.history.setdefault(stream, deque(maxlen=HISTORY))
        history.extend(frames)
        conns = self.open.get(stream)
        if conns:
            data = chunk(b"".join(frame for _, frame in frames))
            for conn in conns:
                conn.transport.write(data)

    def end(self, stream: str, final: tuple[int, bytes]) -> None:
        """Publish the terminal event, then end every open stream of `stream` (the upstream closes after it)."""
        self.publish(stream, [final])
        self.ended.add(stream)
        for conn in list(self.open.pop(stream, ())):
            conn.finish()

    def forget(self, stream: str) -> None:
        """Drop an ended evaluation's history (its connection count stays for `stats`)."""
        if stream in self.ended:
            self.history.pop(stream, None)
            self.ended.discard(stream)

    @property
    def open_connections(self) -> int:
        return sum(len(conns) for conns in self.open.values())


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
        if stream in self.streams.ended:
            self.finish()
            return
        self.streams.open.setdefault(stream, set()).add(self)

    def finish(self) -> None:
        """End the response (after a terminal event) and close, as the real upstream does."""
        self.transport.write(_END_OF_BODY)
        self.transport.close()

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


class _Paced:
    """One evaluation the pacer publishes to: where its events go and how far it has got."""

    __slots__ = ("count", "emit", "rate", "seq", "sink", "started")

    def __init__(self, emit: Any, sink: NchanSink | None, seq: int, rate: float, started: float) -> None:
        self.emit = emit
        self.sink = sink
        self.seq = seq  # the last sequence number published (history included)
        self.rate = rate  # events per second (0: not paced, only ended on command)
        self.count = 0  # events published since `started`
        self.started = started

    def due_at(self) -> float:
        return self.started + (self.count + 1) / self.rate if self.rate > 0 else float("inf")


class Pacer:
    """Publishes to many evaluations at once, each at a steady rate, until each is ended (storm, soak).

    `begin` gives an evaluation `history` events at once (so a run can start in steady state,
    with every replay buffer already full) and then `rate` events per second, the first one
    after `phase` of an interval (so many evaluations interleave instead of firing together);
    `end` publishes the terminal `final` event (it carries the next sequence number, like any
    other) and ends the evaluation's upstream streams; `halt` stops everything.
    """

    def __init__(self, streams: Streams) -> None:
        self.streams = streams
        self.paced: dict[str, _Paced] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def begin(self, cmd: dict[str, Any]) -> dict[str, Any]:
        stream = cmd["stream"]
        if stream in self.paced:
            raise ValueError(f"{stream} is already paced")
        sink: NchanSink | None = None
        if cmd.get("sink") == "nchan":
            sink = await NchanSink.open(cmd["nchan_host"], int(cmd["nchan_port"]))
            path = f"/pub/{stream}".encode()

            def emit(batch: list[tuple[int, bytes, bytes]]) -> None:
                assert sink is not None
                sink.post(path, [payload for _, _, payload in batch])
        else:
            def emit(batch: list[tuple[int, bytes, bytes]]) -> None:
                self.streams.publish(stream, [(seq, sse_frame(seq, payload, event)) for seq, event, payload in batch])
        history = int(cmd.get("history", 0))
        rate = float(cmd.get("rate", 0.0))
        if history:
            now = time.time_ns()
            emit([(seq, EVENT_NAME, make_payload(seq, now)) for seq in range(1, history + 1)])
        phase = float(cmd.get("phase", 0.0)) % 1.0
        started = time.monotonic() - (1.0 - phase) / rate if rate > 0 else time.monotonic()
        self.paced[stream] = _Paced(emit, sink, history, rate, started)
        self._run()
        return {"stream": stream, "seq": history}

    def pace(self, stream: str, rate: float) -> dict[str, Any]:
        """Change one evaluation's rate from now on (0: stop publishing to it)."""
        paced = self.paced[stream]
        paced.rate = rate
        paced.count = 0
        paced.started = time.monotonic()
        self._wake.set()
        return {"stream": stream, "seq": paced.seq}

    async def end(self, stream: str) -> dict[str, Any]:
        """The terminal event, then the end of the evaluation's upstream streams."""
        paced = self.paced.pop(stream)
        paced.seq += 1
        payload = make_payload(paced.seq, time.time_ns())
        if paced.sink is None:
            self.streams.end(stream, (paced.seq, sse_frame(paced.seq, payload, FINAL_EVENT)))
            asyncio.get_running_loop().call_later(ENDED_KEEP_S, self.streams.forget, stream)
        else:
            paced.emit([(paced.seq, FINAL_EVENT, payload)])
            await self._close_sink(paced.sink)
        return {"stream": stream, "seq": paced.seq}

    async def halt(self) -> dict[str, Any]:
        """Stop publishing everywhere; the last sequence number of every evaluation still paced."""
        published = {stream: paced.seq for stream, paced in self.paced.items()}
        paced_all = list(self.paced.values())
        self.paced.clear()
        for paced in paced_all:
            if paced.sink is not None:
                await self._close_sink(paced.sink)
        return {"published": published}

    @staticmethod
    async def _close_sink(sink: NchanSink) -> None:
        await asyncio.sleep(0.05)  # let the last POST be answered before closing
        sink.transport.close()

    def _run(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        self._wake.set()

    async def _loop(self) -> None:
        while self.paced:
            now = time.monotonic()
            next_at = now + 1.0
            sent_ns = time.time_ns()
            for paced in list(self.paced.values()):
                if paced.rate <= 0:
                    continue
                due = int((now - paced.started) * paced.rate)
                if due > paced.count:
                    first = paced.seq + 1
                    paced.seq += due - paced.count
                    paced.count = due
                    paced.emit([(seq, EVENT_NAME, make_payload(seq, sent_ns)) for seq in range(first, paced.seq + 1)])
                next_at = min(next_at, paced.due_at())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0005, next_at - time.monotonic()))


class Control(asyncio.Protocol):
    """Line protocol: `A <run> <worker> <seq>` progress reports, or one JSON command per line."""

    def __init__(self, publisher: Publisher, streams: Streams, pacer: Pacer) -> None:
        self.publisher = publisher
        self.streams = streams
        self.pacer = pacer
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
            elif name == "begin":
                reply = await self.pacer.begin(cmd)
            elif name == "pace":
                reply = self.pacer.pace(cmd["stream"], float(cmd["rate"]))
            elif name == "end":
                reply = await self.pacer.end(cmd["stream"])
            elif name == "halt":
                reply = await self.pacer.halt()
            elif name == "upstream":
                # Every evaluation's upstream connection count (the gateway must open each once).
                names = cmd.get("streams")
                opened = {s: self.streams.opened[s] for s in names} if names else dict(self.streams.opened)
                reply = {"open": self.streams.open_connections, "opened": opened}
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
    pacer = Pacer(streams)
    upstream = await loop.create_server(lambda: UpstreamConnection(streams), host, port, backlog=1024)
    control = await loop.create_server(lambda: Control(publisher, streams, pacer), host, control_port)
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
