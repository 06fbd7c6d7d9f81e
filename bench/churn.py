"""Subscribers that come and go: the reconnect storm and the soak's churn (load-generator side).

A `Seat` is one logical subscriber (one token, so one consumer) that outlives its
connections: it remembers the evaluation it follows, the last sequence number and the last
`id:` it was given. Each connection is a `Conn`, a raw asyncio protocol like the fan-out
subscribers of `bench.loadgen`, that parses HTTP/1.1 and SSE by hand and checks every
payload's sequence number against its seat:

* reconnected with `Last-Event-ID`: the first event must be exactly last + 1 (no gap, no
  duplicate), and so must every one after it;
* connected without an id (the first time, after moving to a new evaluation, or half of the
  soak's reconnects): the server replays what it retains from the start of the stream, so
  the first event may be at or before last + 1 (never after it: that would be a gap); from
  there on, exactly +1 each time. Events at or before last are counted as `replayed`.

A stream the server ends after the evaluation's `final` event moves its seat to the
evaluation it was told to move to (`move`); a stream that ends any other way is reconnected
with `Last-Event-ID`, as a browser's EventSource would, and counted. `Seats` lives in a
load-generator worker process (the `churn_*` operations of `bench.loadgen`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections import Counter
from typing import Any

from bench.chunked import Dechunker
from bench.payload import PATTERN

_LINGER_RST = struct.pack("ii", 1, 0)
_FINAL = b"event: final\n"
_CLOSE_EVENT = b"event: gateway.close\n"


class Seat:
    """One subscriber across its connections."""

    __slots__ = ("auth", "conn", "index", "last", "last_id", "moving_to", "stream")

    def __init__(self, index: int, stream: str, auth: bytes) -> None:
        self.index = index
        self.stream = stream
        self.auth = auth
        self.last = 0  # the last sequence number received on `stream`
        self.last_id: bytes | None = None  # the last `id:` received on `stream`
        self.moving_to: str | None = None  # where to go once `stream` ends with its `final` event
        self.conn: Conn | None = None


class Conn(asyncio.Protocol):
    """One connection of a seat: request, response head, SSE events, sequence check."""

    def __init__(self, owner: Seats, seat: Seat, last_event_id: bytes | None) -> None:
        self.owner = owner
        self.seat = seat
        self.resumed = last_event_id is not None
        #: Without an id the server starts from its retained history: the first event may repeat.
        self.rewind = not self.resumed
        self.request = owner.request(seat, last_event_id)
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.in_body = False
        self.chunked = False
        self.dechunker = Dechunker()
        self.events = b""
        self.status = ""
        self.started = time.monotonic()
        self.headed = 0.0  # when the response head arrived (admission done)
        self.first = 0.0  # when the first event arrived
        self.first_ok: bool | None = None  # whether that event continued the sequence without a gap
        self.final = False
        self.dropped = False  # closed by us
        self.over = False  # ended by the server, refused, or failed
        self.ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @property
    def live(self) -> bool:
        return bool(self.headed) and self.status == "ok" and not self.over and not self.dropped

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.dropped or self.over:
            return
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4:]
            self.head = b""
            self.headed = time.monotonic()
            status_line, _, headers = head.partition(b"\r\n")
            if b" 200 " not in status_line + b" ":
                self.status = status_line.decode("latin-1")
                self._settle(self.status)
                self.over = True
                self.owner.ended(self, "status " + self.status.partition(" ")[2])
                self._close()
                return
            self.status = "ok"
            self.chunked = b"transfer-encoding: chunked" in headers.lower()
            self.in_body = True
            self._settle("ok")
            if not data:
                return
        body = self.dechunker.feed(data) if self.chunked else data
        if self.events:
            body = self.events + body
        end = body.rfind(b"\n\n")
        if end < 0:
            self.events = body
        else:
            self.events = body[end + 2:]
            self._complete(body[:end + 2])
        if self.dechunker.ended and not self.over:
            self.over = True
            self.owner.reached(self)
            self.owner.ended(self, "end of body")
            self._close()

    def _complete(self, data: bytes) -> None:
        """Whole events: check and count their payloads, remember the last id, notice `final`."""
        seat = self.seat
        pairs = PATTERN.findall(data)
        if pairs:
            expected = seat.last + 1
            if self.rewind:
                self.rewind = False
                first = int(pairs[0][0])
                if first <= expected:
                    self.owner.replayed += expected - first
                    expected = first
            if not self.first:
                self.first = time.monotonic()
                self.first_ok = int(pairs[0][0]) == expected
                self.owner.reached(self)
            for seq_b, _ in pairs:
                seq = int(seq_b)
                if seq != expected:
                    self.owner.violation(seat, seq, expected, self.resumed)
                    if seq < expected:
                        continue
                expected = seq + 1
            seat.last = expected - 1
            self.owner.deliveries += len(pairs)
            self.owner.changed.set()
        at = data.rfind(b"id: ")
        while at > 0 and data[at - 1] != 10:  # an `id:` field starts a line
            at = data.rfind(b"id: ", 0, at)
        if at >= 0:
            seat.last_id = data[at + 4:data.index(b"\n", at)]
        if _FINAL in data:
            self.final = True
        elif _CLOSE_EVENT in data:
            code = data.rpartition(b'"code":"')[2].partition(b'"')[0]
            self.owner.close_codes[code.decode("latin-1", "replace")] += 1

    def _settle(self, status: str) -> None:
        if not self.ready.done():
            self.ready.set_result(status)
        if self.over or status != "ok":
            self.owner.reached(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle(self.status or "closed before the response head")
        self.owner.closed(self)
        if not self.dropped and not self.over:
            self.over = True
            self.owner.reached(self)
            self.owner.ended(self, "connection lost" if self.in_body else "closed before the response head")

    def drop(self) -> None:
        """Close from our side with RST (no TIME_WAIT), as a network drop or a closed tab would."""
        self.dropped = True
        self._close()

    def _close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            transport.close()


class Seats:
    """One worker's seats, and the storm and churn operations on them."""

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self.seats: list[Seat] = []
        self.host = "127.0.0.1"
        self.port = 0
        self.path = ""
        self.deliveries = 0
        self.replayed = 0
        self.violations = 0
        self.violators: set[int] = set()
        self.violation_samples: list[str] = []
        self.statuses: Counter[str] = Counter()
        self.reconnects: Counter[str] = Counter()
        self.ends: Counter[str] = Counter()
        self.close_codes: Counter[str] = Counter()
        self.moves = 0
        self.moves_without_final = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._churn: asyncio.Task[None] | None = None
        self._closing = False
        #: Set on every delivery: what `check` waits on.
        self.changed = asyncio.Event()
        #: Connections a `settle` or a `storm` waits for (first event, or the end), and its future.
        self._waiting: set[Conn] = set()
        self._all_reached: asyncio.Future[None] | None = None
        #: Dropped connections whose sockets a storm waits to see closed, and its future.
        self._closing_conns: set[Conn] = set()
        self._all_closed: asyncio.Future[None] | None = None

    # --- connections ---------------------------------------------------------------------

    def request(self, seat: Seat, last_event_id: bytes | None) -> bytes:
        resume = b"last-event-id: " + last_event_id + b"\r\n" if last_event_id is not None else b""
        return (b"GET " + self.path.format(stream=seat.stream).encode() + b" HTTP/1.1\r\nhost: bench\r\n"
                b"accept: text/event-stream\r\ncache-control: no-store\r\n" + seat.auth + resume + b"\r\n")

    async def open(self, seat: Seat, last_event_id: bytes | None) -> Conn:
        return await self.connect_conn(Conn(self, seat, last_event_id))

    async def connect_conn(self, conn: Conn) -> Conn:
        conn.seat.conn = conn
        conn.started = time.monotonic()
        try:
            await asyncio.get_running_loop().create_connection(lambda: conn, self.host, self.port)
        except OSError as exc:
            conn.over = True
            conn.status = f"connect error: {exc.strerror or exc}"
            conn._settle(conn.status)
        return conn

    def closed(self, conn: Conn) -> None:
        """`conn`'s socket is closed."""
        closing = self._closing_conns
        if conn in closing:
            closing.discard(conn)
            if not closing and self._all_closed is not None and not self._all_closed.done():
                self._all_closed.set_result(None)

    def reached(self, conn: Conn) -> None:
        """`conn` has its first event, or will never get one."""
        waiting = self._waiting
        if conn in waiting:
            waiting.discard(conn)
            if not waiting and self._all_reached is not None and not self._all_reached.done():
                self._all_reached.set_result(None)

    async def _wait_reached(self, conns: list[Conn], timeout: float) -> None:
        """Until every one of `conns` has its first event or has ended, or `timeout` passes."""
        self._waiting = {c for c in conns if not c.first and not c.over}
        if not self._waiting:
            return
        self._all_reached = asyncio.get_running_loop().create_future()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_reached, timeout)
        finally:
            self._waiting = set()
            self._all_reached = None

    def _spawn(self, seat: Seat, last_event_id: bytes | None) -> None:
        task = asyncio.get_running_loop().create_task(self.open(seat, last_event_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def ended(self, conn: Conn, how: str) -> None:
        """The server ended `conn`: move on after `final`, otherwise reconnect like a browser."""
        seat = conn.seat
        if self._closing or seat.conn is not conn:
            return
        if seat.moving_to is not None and (conn.final or conn.status.startswith("HTTP/1.1 204")):
            self.moves += 1
            if not conn.final:
                self.moves_without_final += 1
            seat.stream, seat.moving_to = seat.moving_to, None
            seat.last, seat.last_id = 0, None
            self._spawn(seat, None)
            return
        self.ends[how] += 1
        if conn.status != "ok":
            return  # refused, or closed before answering: counted, not retried
        self.reconnects["after a server close"] += 1
        self._spawn(seat, seat.last_id)

    def violation(self, seat: Seat, got: int, expected: int, resumed: bool) -> None:
        self.violations += 1
        self.violators.add(seat.index)
        if len(self.violation_samples) < 5:
            self.violation_samples.append(f"seat {seat.index} on {seat.stream}: got {got}, expected {expected}"
                                          f" ({'resumed with Last-Event-ID' if resumed else 'no id'})")

    async def connect(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Open `count` seats (indexes from `first`) over `streams`, `concurrency` at a time."""
        self.host, self.port, self.path = msg["host"], int(msg["port"]), msg["path"]
        streams: list[str] = msg["streams"]
        secret = msg.get("secret")
        ttl = float(msg.get("ttl", 3600))
        new: list[Seat] = []
        for index in range(msg["first"], msg["first"] + msg["count"]):
            new.append(Seat(index, streams[index % len(streams)], _auth(secret, f"{msg['run']}-{index}", ttl)))
        self.seats += new
        gate = asyncio.Semaphore(int(msg.get("concurrency", 200)))
        timeout = float(msg.get("timeout", 60))
        started = time.monotonic()
        statuses: Counter[str] = Counter()

        async def one(seat: Seat) -> None:
            async with gate:
                conn = await self.open(seat, None)
                try:
                    statuses[await asyncio.wait_for(asyncio.shield(conn.ready), timeout)] += 1
                except TimeoutError:
                    statuses["no response head"] += 1

        await asyncio.gather(*(one(seat) for seat in new))
        conns = [s.conn for s in new if s.conn is not None and s.conn.headed]
        return {"statuses": dict(statuses), "seconds": time.monotonic() - started,
                "admission_ms": [round(1000 * (c.headed - c.started), 3) for c in conns]}

    async def settle(self, timeout: float) -> dict[str, Any]:
        """Wait until every seat has received an event (so it has an id to resume from)."""
        await self._wait_reached([s.conn for s in self.seats if s.conn is not None and s.last == 0], timeout)
        return {"settled": sum(1 for s in self.seats if s.last > 0), "seats": len(self.seats)}

    # --- the storm -------------------------------------------------------------------------

    async def storm(self, timeout: float) -> dict[str, Any]:
        """Drop every seat at once, reconnect every one at once with its last id, time the way back."""
        seats = [s for s in self.seats if s.conn is not None and s.conn.live]
        old = [s.conn for s in seats if s.conn is not None]
        self._closing_conns = set(old)
        self._all_closed = asyncio.get_running_loop().create_future()
        dropped = time.monotonic()
        for conn in old:
            conn.drop()
        # Reconnect once every old socket is closed (its RST sent): the new ones must not need
        # twice the descriptors, and the server should see the drop before the comeback.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_closed, 10)
        self._closing_conns = set()
        self._all_closed = None
        reconnected = time.monotonic()
        conns = [Conn(self, seat, seat.last_id) for seat in seats]
        waiting = asyncio.get_running_loop().create_task(self._wait_reached(conns, timeout))
        await asyncio.gather(*(self.connect_conn(conn) for conn in conns))
        await waiting
        statuses = Counter(c.status or "no response head" for c in conns)
        headed = [c for c in conns if c.status == "ok"]
        resumed = [c for c in headed if c.first]
        return {
            "seats": len(seats), "dropped": dropped, "reconnected": reconnected, "statuses": dict(statuses),
            "first_start": min((c.started for c in conns), default=reconnected),
            "last_head": max((c.headed for c in headed), default=0.0),
            "last_first": max((c.first for c in resumed), default=0.0),
            "resumed": len(resumed), "no_gap": sum(1 for c in resumed if c.first_ok),
            "admission_ms": [round(1000 * (c.headed - c.started), 3) for c in headed],
            "resume_ms": [round(1000 * (c.first - reconnected), 3) for c in resumed],
        }

    # --- the soak's churn ------------------------------------------------------------------

    def churn(self, per_minute: float, seed: int) -> dict[str, Any]:
        """Reconnect `per_minute` of the seats each minute, evenly spread; 0 stops it."""
        if self._churn is not None:
            self._churn.cancel()
            self._churn = None
        if per_minute > 0 and self.seats:
            interval = 60.0 / (per_minute * len(self.seats))
            self._churn = asyncio.get_running_loop().create_task(self._churn_loop(interval, random.Random(seed)))
        return {"ok": True}

    async def _churn_loop(self, interval: float, rng: random.Random) -> None:
        with_id = rng.random() < 0.5
        next_at = time.monotonic() + rng.uniform(0, interval)
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            for _ in range(20):  # a seat that is connected and not moving
                seat = rng.choice(self.seats)
                if seat.conn is not None and seat.conn.live and seat.moving_to is None and seat.last > 0:
                    break
            else:
                self.reconnects["skipped (no idle seat)"] += 1
                continue
            assert seat.conn is not None
            seat.conn.drop()
            self.reconnects["with Last-Event-ID" if with_id else "without an id"] += 1
            self._spawn(seat, seat.last_id if with_id else None)
            with_id = not with_id

    def move(self, old: str, new: str) -> dict[str, Any]:
        """Seats on `old` go to `new` once `old` has sent its `final` event."""
        count = 0
        for seat in self.seats:
            if seat.stream == old:
                seat.moving_to = new
                count += 1
        return {"moving": count}

    async def check(self, published: dict[str, int], timeout: float) -> dict[str, Any]:
        """Wait until every seat has its evaluation's last event; what is missing if some never do."""
        deadline = time.monotonic() + timeout

        def behind() -> list[Seat]:
            return [s for s in self.seats if s.moving_to is not None or s.last != published.get(s.stream, -1)]

        late = behind()
        while late and time.monotonic() < deadline:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(0.5, max(0.0, deadline - time.monotonic())))
            late = behind()
        return {"seats": len(self.seats), "complete": len(self.seats) - len(late),
                "late_samples": [f"seat {s.index} on {s.stream}: at {s.last} of {published.get(s.stream)}"
                                 f"{' (moving)' if s.moving_to else ''}" for s in late[:5]]}

    def stats(self) -> dict[str, Any]:
        return {
            "seats": len(self.seats), "open": sum(1 for s in self.seats if s.conn is not None and s.conn.live),
            "deliveries": self.deliveries, "replayed": self.replayed, "violations": self.violations,
            "violators": len(self.violators), "violation_samples": self.violation_samples,
            "statuses": dict(self.statuses), "reconnects": dict(self.reconnects), "ends": dict(self.ends),
            "close_codes": dict(self.close_codes), "moves": self.moves,
            "moves_without_final": self.moves_without_final,
        }

    def close(self) -> dict[str, Any]:
        """Drop every seat (RST) and forget them."""
        self._closing = True
        if self._churn is not None:
            self._churn.cancel()
            self._churn = None
        for task in list(self._tasks):
            task.cancel()
        for seat in self.seats:
            if seat.conn is not None:
                seat.conn.drop()
        self.seats = []
        return {"ok": True}


def _auth(secret: str | None, subject: str, ttl: float) -> bytes:
    if secret is None:
        return b""
    from bench.internals import mint_token

    token = mint_token(secret, "HS256", f"bench-{subject}", ttl, {"streams": ["*/*"]})
    return b"authorization: Bearer " + token.encode() + b"\r\n"


async def handle(seats: Seats, msg: dict[str, Any]) -> dict[str, Any]:
    """One `churn_*` operation of a load-generator worker."""
    op = msg["op"]
    if op == "churn_connect":
        return await seats.connect(msg)
    if op == "churn_settle":
        return await seats.settle(float(msg["timeout"]))
    if op == "churn_storm":
        return await seats.storm(float(msg["timeout"]))
    if op == "churn_soak":
        return seats.churn(float(msg["per_minute"]), int(msg.get("seed", 0)))
    if op == "churn_move":
        return seats.move(msg["old"], msg["new"])
    if op == "churn_check":
        return await seats.check(msg["published"], float(msg["timeout"]))
    if op == "churn_stats":
        return seats.stats()
    if op == "churn_close":
        return seats.close()
    return {"error": f"unknown op {op}"}
