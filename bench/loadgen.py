"""The load generator: N authenticated SSE or WebSocket subscribers on raw asyncio protocols.

Each worker process runs one uvloop event loop holding its share of the subscribers. A
subscriber is an `asyncio.Protocol` that parses HTTP/1.1 (chunked or not) and SSE, or a
WebSocket handshake and frames, by hand; no HTTP library and no task per client. On every
read it finds each payload's `(sequence, send time)` with one regular expression, checks the
sequence is exactly the next one (every message once, in order), and counts the latency
(receive time - send time) into a fixed-width histogram.

Progress goes to the publisher as `A <run> <worker> <seq>` lines ("every subscriber of this
worker has every message up to seq"), which drives the closed loop. The orchestrator
(`bench.run`) talks to the workers through `LoadGen`, over multiprocessing pipes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import multiprocessing
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench.chunked import Dechunker
from bench.payload import PATTERN
from bench.procstat import raise_fd_limit, self_cpu_seconds

#: Latency histogram: fixed 20 microsecond buckets up to 5 s (slower deliveries land in the last one).
BUCKET_NS = 20_000
BUCKETS = 250_000
_LINGER_RST = struct.pack("ii", 1, 0)
_CONNECT_CONCURRENCY = 200


@dataclass
class Target:
    """Where and how to subscribe."""

    host: str
    port: int
    transport: str  # "sse" | "ws"
    path: str  # SSE: the stream path; WS: the upgrade path
    stream: str  # WS: the stream name to subscribe to ("evaluations/<id>")
    token_secret: str | None = None  # None: no Authorization header (naive app, nchan)
    token_prefix: str = "bench"


class Tally:
    """What one worker saw: deliveries, order violations, the latency histogram."""

    __slots__ = ("bytes", "deliveries", "hist", "max_ns", "violation_samples", "violations")

    def __init__(self) -> None:
        self.deliveries = 0
        self.bytes = 0
        self.violations = 0
        self.violation_samples: list[str] = []
        self.max_ns = 0
        self.hist = [0] * (BUCKETS + 1)

    def violation(self, text: str) -> None:
        self.violations += 1
        if len(self.violation_samples) < 5:
            self.violation_samples.append(text)


class Progress:
    """Tracks the lowest sequence every subscriber of this worker has reached (O(1) per read)."""

    def __init__(self, subscribers: int, limit: int, report: Callable[[int], None]) -> None:
        self.at = [0] * (limit + 2)  # how many subscribers have `last == seq`
        self.at[0] = subscribers
        self.floor = 0 if subscribers else limit
        self.limit = limit
        self.report = report
        self._scheduled = False

    def moved(self, old: int, new: int) -> None:
        at = self.at
        cap = self.limit + 1
        old = old if old < cap else cap
        at[old] -= 1
        at[new if new < cap else cap] += 1
        if old == self.floor and at[old] == 0:
            floor = old
            while floor <= self.limit and at[floor] == 0:
                floor += 1
            self.floor = floor
            if not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        self.report(self.floor)


class Subscriber(asyncio.Protocol):
    """Common part: connection, the sequence check and the latency count."""

    def __init__(self, worker: Worker, index: int) -> None:
        self.worker = worker
        self.index = index
        self.transport: asyncio.Transport | None = None
        self.last = 0
        self.ready = asyncio.get_running_loop().create_future()
        self.closed = False
        self.status = ""
        self.close_note = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self.request())

    def request(self) -> bytes:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_result(self.status or "closed before ready")
        if not self.worker.closing:
            self.worker.lost += 1

    def _payloads(self, data: bytes) -> None:
        """Check and count every payload in `data` (whole events only)."""
        self._count(PATTERN.findall(data))

    def _count(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """Check the order of, and count, the (sequence, send time) pairs found in whole events."""
        if not pairs:
            return
        now = time.time_ns()
        tally = self.worker.tally
        hist = tally.hist
        expected = self.last + 1
        worst = 0
        for seq, sent in pairs:
            seq_i = int(seq)
            if seq_i != expected:
                tally.violation(f"subscriber {self.index}: got {seq_i}, expected {expected}")
                if seq_i < expected:
                    continue
            expected = seq_i + 1
            delay = now - int(sent)
            if delay > worst:
                worst = delay
            bucket = delay // BUCKET_NS
            hist[bucket if bucket < BUCKETS else BUCKETS] += 1
        if worst > tally.max_ns:
            tally.max_ns = worst
        tally.deliveries += len(pairs)
        old = self.last
        self.last = expected - 1
        progress = self.worker.progress
        if progress is not None and self.last != old:
            progress.moved(old, self.last)


def _auth_header(target: Target, index: int, worker_id: int, run: str) -> bytes:
    if target.token_secret is None:
        return b""
    from bench.internals import mint_token

    token = mint_token(target.token_secret, "HS256", f"{target.token_prefix}-{run}-{worker_id}-{index}", 3600,
                       {"streams": ["*/*"]})
    return b"authorization: Bearer " + token.encode() + b"\r\n"


class SSESubscriber(Subscriber):
    """`GET <path>` with `Accept: text/event-stream`; HTTP/1.1 chunked (or close-delimited) body."""

    def __init__(self, worker: Worker, index: int, target: Target, auth: bytes) -> None:
        super().__init__(worker, index)
        self.target = target
        self.auth = auth
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.dechunker = Dechunker()
        self.events = b""  # an incomplete SSE event carried over to the next read

    def request(self) -> bytes:
        return (b"GET " + self.target.path.encode() + b" HTTP/1.1\r\nhost: bench\r\naccept: text/event-stream\r\n"
                + b"cache-control: no-store\r\n" + self.auth + b"\r\n")

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4:]
            self.head = b""
            status_line, _, headers = head.partition(b"\r\n")
            self.status = status_line.decode("latin-1")
            if b" 200 " not in status_line + b" ":
                self.ready.set_result(self.status)
                assert self.transport is not None
                self.transport.close()
                return
            self.chunked = b"transfer-encoding: chunked" in headers.lower()
            self.in_body = True
            self.ready.set_result("ok")
            if not data:
                return
        self.worker.tally.bytes += len(data)
        if self.chunked:
            body = self.dechunker.feed(data)
            if self.dechunker.ended:
                self.close_note = "end of body"
        else:
            body = data
        if self.events:
            body = self.events + body
        end = body.rfind(b"\n\n")
        if end < 0:
            self.events = body
            return
        self.events = body[end + 2:]
        self._payloads(body[:end])


class WSSubscriber(Subscriber):
    """A WebSocket client: upgrade with the token in `Authorization`, subscribe, read text frames."""

    def __init__(self, worker: Worker, index: int, target: Target, auth: bytes) -> None:
        super().__init__(worker, index)
        self.target = target
        self.auth = auth
        self.head = b""
        self.upgraded = False
        self.buffer = b""

    def request(self) -> bytes:
        key = base64.b64encode(os.urandom(16))
        return (b"GET " + self.target.path.encode() + b" HTTP/1.1\r\nhost: bench\r\nupgrade: websocket\r\n"
                b"connection: Upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: " + key + b"\r\n"
                + self.auth + b"\r\n")

    def send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 65536:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert self.transport is not None
        self.transport.write(header + mask + masked)

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4:]
            self.head = b""
            self.status = head.partition(b"\r\n")[0].decode("latin-1")
            if b" 101 " not in self.status.encode() + b" ":
                self.ready.set_result(self.status)
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            stream = self.target.stream.encode()
            self.send_frame(1, b'{"type":"subscribe","stream":"' + stream + b'"}')
        self.worker.tally.bytes += len(data)
        buffer = self.buffer + data if self.buffer else data
        size = len(buffer)
        if self.ready.done() and b"\x88" not in buffer and b"\x89" not in buffer:
            # No close or ping (nor a length byte that looks like one): only the last frame can be
            # incomplete, so find where it starts instead of walking every header.
            start = buffer.rfind(b'{"type":"')
            # The longer header first: its first byte (0x81) cannot be payload text, while a
            # 16-bit length may end in bytes that look like a short header.
            if start >= 4 and buffer[start - 4] == 0x81 and buffer[start - 3] == 126:
                header, length = start - 4, (buffer[start - 2] << 8) | buffer[start - 1]
            elif start >= 2 and buffer[start - 2] == 0x81 and buffer[start - 1] < 126:
                header, length = start - 2, buffer[start - 1]
            else:
                header = length = -1
            if header >= 0:
                cut = start + length if start + length <= size else header
                self.buffer = buffer[cut:]
                self._count(PATTERN.findall(buffer, 0, cut))
                return
        pos = 0
        # Walk frame headers only; the payload markers are found by one regex pass over every
        # complete frame (headers never match it), with no per-frame slicing or joining.
        while size - pos >= 2:
            length = buffer[pos + 1] & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if size - pos < 4:
                    break
                length = (buffer[pos + 2] << 8) | buffer[pos + 3]
                start = pos + 4
            else:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2:pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            if buffer[pos] != 0x81:
                opcode = buffer[pos] & 0x0F
                if opcode == 9:
                    self.send_frame(10, buffer[start:end])
                elif opcode == 8:
                    self.close_note = "close frame " + buffer[start:end][:120].decode("utf-8", "replace")
            pos = end
        self.buffer = buffer[pos:]
        if pos:
            if not self.ready.done():
                self.ready.set_result("ok")
            self._count(PATTERN.findall(buffer, 0, pos))


class Worker:
    """One process's subscribers and its connection to the publisher."""

    def __init__(self, worker_id: int, control: tuple[str, int]) -> None:
        self.worker_id = worker_id
        self.control = control
        self.subscribers: list[Subscriber] = []
        self.tally = Tally()
        self.progress: Progress | None = None
        self.closing = False
        self.lost = 0
        self.run = ""
        self.ack_writer: asyncio.StreamWriter | None = None
        self.seats: Any = None  # bench.churn.Seats, for the storm and the soak

    async def churn(self, msg: dict[str, Any]) -> dict[str, Any]:
        """A `churn_*` operation (bench.churn): subscribers that drop, resume and move."""
        from bench import churn

        if self.seats is None:
            self.seats = churn.Seats(self.worker_id)
            gc.enable()  # long runs with churn make garbage; no latency histogram to protect here
        reply = await churn.handle(self.seats, msg)
        if msg["op"] == "churn_close":
            self.seats = None
            gc.collect()
        return reply

    async def connect(self, target: Target, count: int, run: str, ready_timeout: float) -> dict[str, Any]:
        self.closing = False
        self.lost = 0
        self.run = run
        loop = asyncio.get_running_loop()
        if self.ack_writer is None:
            _, self.ack_writer = await asyncio.open_connection(*self.control)
        gate = asyncio.Semaphore(_CONNECT_CONCURRENCY)
        first = len(self.subscribers)
        statuses: Counter[str] = Counter()
        started = time.monotonic()

        async def open_one(index: int) -> None:
            auth = _auth_header(target, index, self.worker_id, run)
            cls = SSESubscriber if target.transport == "sse" else WSSubscriber
            async with gate:
                try:
                    _, sub = await loop.create_connection(lambda: cls(self, index, target, auth),
                                                          target.host, target.port)
                except OSError as exc:
                    statuses[f"connect error: {exc.strerror or exc}"] += 1
                    return
                self.subscribers.append(sub)
                if target.transport == "sse":
                    try:
                        status = await asyncio.wait_for(asyncio.shield(sub.ready), ready_timeout)
                    except TimeoutError:
                        status = "no response headers"
                    statuses[status] += 1

        await asyncio.gather(*(open_one(first + i) for i in range(count)))
        if target.transport == "ws":
            # The upgrade answer is not proof of a subscription; wait for the first server message
            # (the gateway acknowledges a subscribe). Thousands of handshakes on a busy machine can
            # take longer than a few seconds, so the grace period is the whole ready timeout.
            subs = self.subscribers[first:]
            waits = [asyncio.shield(s.ready) for s in subs]
            done, _ = await asyncio.wait(waits, timeout=ready_timeout) if waits else (set(), set())
            for sub in subs:
                if sub.ready.done():
                    statuses[sub.ready.result()] += 1
                elif sub.upgraded:
                    statuses["ok"] += 1  # upgraded, silent: assume subscribed
                else:
                    statuses["no upgrade answer"] += 1
            del done
        return {"statuses": dict(statuses), "seconds": time.monotonic() - started,
                "open": sum(1 for s in self.subscribers if not s.closed)}

    def start(self, run: str, limit: int) -> None:
        """Reset counters for a publication of at most `limit` messages."""
        self.run = run
        self.tally = Tally()
        alive = [s for s in self.subscribers if not s.closed]
        for sub in alive:
            sub.last = 0
        writer = self.ack_writer
        prefix = f"A {run} {self.worker_id} ".encode()

        def report(seq: int) -> None:
            if writer is not None:
                writer.write(prefix + str(seq).encode() + b"\n")

        self.progress = Progress(len(alive), limit, report)
        report(self.progress.floor)

    def stats(self) -> dict[str, Any]:
        tally = self.tally
        lasts = Counter(s.last for s in self.subscribers)
        sparse = {i: n for i, n in enumerate(tally.hist) if n}
        notes = Counter(s.close_note for s in self.subscribers if s.close_note)
        return {
            "deliveries": tally.deliveries, "bytes": tally.bytes, "violations": tally.violations,
            "violation_samples": tally.violation_samples, "max_ns": tally.max_ns, "hist": sparse,
            "subscribers": len(self.subscribers), "open": sum(1 for s in self.subscribers if not s.closed),
            "lost": self.lost, "last_seq_counts": {str(k): v for k, v in lasts.items()},
            "close_notes": dict(notes.most_common(3)), "cpu": self_cpu_seconds(),
        }

    def close_all(self) -> None:
        self.closing = True
        for sub in self.subscribers:
            transport = sub.transport
            if transport is not None and not transport.is_closing():
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    # RST instead of FIN: no TIME_WAIT, so repeated runs never run out of ports.
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                transport.close()
        self.subscribers = []
        self.progress = None


def _worker_main(conn: Connection, worker_id: int, control: tuple[str, int]) -> None:
    raise_fd_limit()
    gc.disable()
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = Worker(worker_id, control)
    stop = loop.create_future()
    pending: set[asyncio.Task[None]] = set()

    async def handle(msg: dict[str, Any]) -> None:
        op = msg["op"]
        try:
            if op == "connect":
                reply = await worker.connect(Target(**msg["target"]), msg["count"], msg["run"], msg["timeout"])
            elif op == "start":
                worker.start(msg["run"], msg["limit"])
                reply = {"ok": True}
            elif op == "stats":
                reply = worker.stats()
            elif op.startswith("churn_"):
                reply = await worker.churn(msg)
            elif op == "close":
                worker.close_all()
                await asyncio.sleep(0.05)
                gc.collect()
                reply = {"ok": True}
            elif op == "exit":
                worker.close_all()
                reply = {"ok": True}
                if not stop.done():
                    stop.set_result(None)
            else:
                reply = {"error": f"unknown op {op}"}
        except Exception as exc:
            reply = {"error": repr(exc)}
        os.set_blocking(conn.fileno(), True)  # the event loop made it non-blocking; replies can be large
        conn.send(reply)

    def readable() -> None:
        try:
            msg = conn.recv()
        except EOFError:
            if not stop.done():
                stop.set_result(None)
            return
        task = loop.create_task(handle(msg))
        pending.add(task)
        task.add_done_callback(pending.discard)

    loop.add_reader(conn.fileno(), readable)
    try:
        loop.run_until_complete(stop)
    finally:
        loop.remove_reader(conn.fileno())
        loop.close()


class LoadGen:
    """The orchestrator's handle on the worker processes."""

    def __init__(self, workers: int, control: tuple[str, int]) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for worker_id in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, worker_id, control), daemon=True,
                               name=f"bench-loadgen-{worker_id}")
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _all(self, msgs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        for pipe, msg in zip(self.pipes, msgs, strict=True):
            pipe.send(msg)
        replies = []
        deadline = time.monotonic() + timeout
        for pipe in self.pipes:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"load generator did not answer {msgs[0]['op']!r} within {timeout}s")
            reply = pipe.recv()
            if "error" in reply:
                raise RuntimeError(f"load generator failed: {reply['error']}")
            replies.append(reply)
        return replies

    def connect(self, target: Target, total: int, run: str, timeout: float = 60.0) -> dict[str, Any]:
        """Open `total` subscribers spread over the workers; returns merged answer statuses."""
        share = [total // len(self.pipes) + (1 if i < total % len(self.pipes) else 0) for i in range(len(self.pipes))]
        msgs = [{"op": "connect", "target": target.__dict__, "count": n, "run": run, "timeout": timeout}
                for n in share]
        replies = self._all(msgs, timeout + 30)
        statuses: Counter[str] = Counter()
        for reply in replies:
            statuses.update(reply["statuses"])
        return {"statuses": dict(statuses), "open": sum(r["open"] for r in replies),
                "seconds": max(r["seconds"] for r in replies)}

    def start(self, run: str, limit: int) -> None:
        self._all([{"op": "start", "run": run, "limit": limit}] * len(self.pipes), 30)

    def stats(self) -> list[dict[str, Any]]:
        return self._all([{"op": "stats"}] * len(self.pipes), 30)

    def close(self) -> None:
        self._all([{"op": "close"}] * len(self.pipes), 30)

    def churn(self, op: str, wait: float = 60.0, **fields: Any) -> list[dict[str, Any]]:
        """The same `churn_*` operation (bench.churn) on every worker, answered within `wait` s; their replies."""
        return self._all([{"op": f"churn_{op}", **fields}] * len(self.pipes), wait)

    def churn_connect(self, total: int, timeout: float = 60.0, **fields: Any) -> list[dict[str, Any]]:
        """Open `total` seats spread over the workers (distinct indexes, so distinct tokens)."""
        workers = len(self.pipes)
        share = [total // workers + (1 if i < total % workers else 0) for i in range(workers)]
        firsts = [sum(share[:i]) for i in range(workers)]
        return self._all([{"op": "churn_connect", "first": first, "count": count, "timeout": timeout, **fields}
                          for first, count in zip(firsts, share, strict=True)], timeout + 120)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self._all([{"op": "exit"}] * len(self.pipes), 10)
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


@dataclass
class Merged:
    """Every worker's tally, combined."""

    deliveries: int = 0
    violations: int = 0
    violation_samples: list[str] = field(default_factory=list)
    hist: Counter[int] = field(default_factory=Counter)
    max_ns: int = 0
    subscribers: int = 0
    open: int = 0
    lost: int = 0
    last_seq_counts: Counter[int] = field(default_factory=Counter)
    close_notes: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, stats: list[dict[str, Any]]) -> Merged:
        merged = cls()
        for s in stats:
            merged.deliveries += s["deliveries"]
            merged.violations += s["violations"]
            merged.violation_samples += s["violation_samples"]
            merged.hist.update({int(k): v for k, v in s["hist"].items()})
            merged.max_ns = max(merged.max_ns, s["max_ns"])
            merged.subscribers += s["subscribers"]
            merged.open += s["open"]
            merged.lost += s["lost"]
            merged.last_seq_counts.update({int(k): v for k, v in s["last_seq_counts"].items()})
            merged.close_notes.update(s["close_notes"])
        return merged

    def percentile(self, q: float) -> float:
        """Latency percentile in milliseconds (bucket upper bound)."""
        total = sum(self.hist.values())
        if not total:
            return float("nan")
        rank = q / 100.0 * total
        seen = 0
        for bucket in sorted(self.hist):
            seen += self.hist[bucket]
            if seen >= rank:
                return (bucket + 1) * BUCKET_NS / 1e6
        return self.max_ns / 1e6
