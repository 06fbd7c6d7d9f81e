"""The Python cost of one fan-out pass, per subscriber, without sockets.

`python -m bench.flushpass [N]` subscribes N SSE streams (the gateway's own `_Stream`)
to one topic, gives each a socket stand-in whose `write` only keeps the bytes, and times
publish → flush pass → every subscriber written. With one event per pass this is the
fixed-rate case of the fan-out benchmark minus the `write` syscalls: what the gateway
adds per subscriber on top of a raw write loop. The same for WebSocket connections.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

import uvloop

from gateway.auth.admission import Admission, Admitted
from gateway.auth.authz import Authorizer
from gateway.auth.tokens import Authenticator, Principal
from gateway.codec.events import Event
from gateway.config import AuthConfig, JWTConfig, LimitsConfig, ServerConfig, WebSocketConfig
from gateway.hub.registry import Hub
from gateway.limits.connections import ConnectionLimiter
from gateway.limits.exclusive import ExclusiveStreams
from gateway.limits.quota import StreamQuota
from gateway.metrics import Metrics
from gateway.transports.direct import _Detached
from gateway.transports.ending import Expiries
from gateway.transports.sse import SSEStreams, _Stream

PASSES = 60
KEY = "evaluations/bench"


class _Broker:
    def attach(self, topic: Any) -> None:
        return None

    async def detach(self, topic: Any) -> None:
        return None


class _Socket:
    """A transport (and a `WSChannel`) that keeps the last bytes written and is never full."""

    __slots__ = ("last", "writes")
    paused = False
    frames = True

    def is_closing(self) -> bool:
        return False

    def __init__(self) -> None:
        self.last = b""
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.last = data
        self.writes += 1

    def write_frames(self, data: bytes) -> None:
        self.write(data)

    def send_text(self, text: str) -> None:
        return None

    def close(self, *args: Any) -> None:
        return None

    def abort(self) -> None:
        return None

    def keepalive(self, *args: Any) -> None:
        return None


def _event(i: int) -> Event:
    data = f'{{"seq":{i},"sent":{time.time():f},"pad":"{"x" * 40}"}}'
    return Event(KEY, str(i), "progress", data, time.monotonic())


async def _passes(hub: Hub, sockets: list[_Socket]) -> list[float]:
    topic = hub.topics[KEY]
    times: list[float] = []
    for i in range(PASSES):
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        last = sockets[-1]
        before = last.writes
        started = time.perf_counter()
        topic.publish(_event(i))
        # The flush pass runs in the next loop iteration; this callback is queued behind it.
        asyncio.get_running_loop().call_soon(_stamp, done)
        ended = await done
        assert last.writes == before + 1, "the pass did not reach every subscriber"
        times.append(ended - started)
    return times


def _stamp(done: asyncio.Future[float]) -> None:
    done.set_result(time.perf_counter())


def _admission(hub: Hub, metrics: Metrics, limits: LimitsConfig) -> Admission:
    """The real admission path, with a token that grants every stream (no webhook, no Redis)."""
    auth = AuthConfig(jwt=JWTConfig(secret="x" * 32))
    server = ServerConfig(max_connections=1 << 30, max_connections_per_ip=1 << 30)
    return Admission(server, Authenticator(auth), Authorizer(auth), metrics, hub=hub,
                     limiter=ConnectionLimiter(server), quota=StreamQuota(limits.max_streams_per_consumer),
                     exclusive=ExclusiveStreams(limits))


def _admitted(i: int) -> Admitted:
    principal = Principal(consumer=f"user-{i}", claims={}, expires_at=time.time() + 3600, streams=("*/*",))
    return Admitted(principal, "127.0.0.1", None, False)


async def sse(n: int) -> float:
    limits = LimitsConfig()
    metrics = Metrics()
    hub = Hub(limits, _Broker(), metrics)
    admission = _admission(hub, metrics, limits)
    streams = SSEStreams(admission, limits, metrics, Expiries())
    sockets = []
    for i in range(n):
        admitted = _admitted(i)
        hold = await admission.join(admitted, KEY, None)
        await hold.claim()
        stream = _Stream(streams, hold, admission.connection(admitted), admitted.principal.valid_until)
        socket = _Socket()
        stream._start(_Detached(socket, False))
        sockets.append(socket)
    return statistics.median(await _passes(hub, sockets)) / n


async def ws(n: int) -> float:
    from gateway.codec import ws_messages as proto
    from gateway.transports.websocket import WebSocketStreams
    from gateway.transports.ws_connection import WSConnection

    limits = LimitsConfig()
    metrics = Metrics()
    hub = Hub(limits, _Broker(), metrics)
    admission = _admission(hub, metrics, limits)
    endpoint = WebSocketStreams(admission, limits, WebSocketConfig(), metrics, Expiries())
    sockets = []
    for i in range(n):
        socket = _Socket()
        admitted = _admitted(i)
        connection = WSConnection(endpoint, admitted, admission.connection(admitted))
        connection.channel = socket
        await connection._subscribe(proto.Subscribe(stream=KEY, after_event_id=None))
        sockets.append(socket)
    await asyncio.sleep(0)  # the flush each subscribe queued (nothing to write yet)
    return statistics.median(await _passes(hub, sockets)) / n


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    n = int(args[0]) if args else 5000
    print(f"N={n}, one event per pass, median of {PASSES} passes:")
    print(f"  SSE: {uvloop.run(sse(n)) * 1e6:.2f} us of Python per subscriber per pass")
    print(f"  WS:  {uvloop.run(ws(n)) * 1e6:.2f} us of Python per subscriber per pass")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
