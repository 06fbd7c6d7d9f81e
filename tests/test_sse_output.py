"""The SSE stream's two outputs behave alike: the detached socket (`gateway.direct`, the default
under `gateway serve`) and ASGI `send` (any other server; here uvicorn's h11 protocol).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import Gateway, Received, Sim, read_sse, terminal
from tests.servers import wait_for
from tests.wsclient import gateway_with_small_send_buffers


@pytest.fixture(params=["direct", "send"])
def direct(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "direct")


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    return gateway.app.metrics.registry.get_sample_value(name, labels or None) or 0.0


def released(gateway: Gateway) -> Callable[[], bool]:
    """Every stream's resources are back: connection counts, subscriptions and the subscriber gauge."""
    app = gateway.app

    def check() -> bool:
        subscribed = sum(len(topic.subscribers) for topic in app.hub.topics.values())
        return (app.limiter.total == 0 and subscribed == 0
                and metric(gateway, "gateway_subscribers", transport="sse", kind="evaluations") == 0)

    return check


async def test_clients_get_the_whole_stream_and_leave_nothing_behind(sim: Sim, gateway_factory: Any,
                                                                      direct: bool) -> None:
    gateway = await gateway_factory(direct=direct)
    await sim.post("/_sim/configure", {"resource": "evaluations/e-out", "rows": 15, "interval": 0.01})
    url = f"{gateway.url}/api/v1/evaluations/e-out/stream"
    results = await asyncio.gather(*(read_sse(url, gateway.headers(f"u{i}"), until=terminal) for i in range(4)))
    expected = [str(i) for i in range(1, 2 + 30 + 2 + 1)]
    for got in results:
        assert got.status == 200 and got.ids == expected and got.events[-1][1] == "final"
    await wait_for(released(gateway), message="streams released")
    assert metric(gateway, "gateway_frames_sent_total", transport="sse") == 4 * len(expected)


async def test_a_client_that_leaves_mid_stream_is_released(sim: Sim, gateway_factory: Any, direct: bool) -> None:
    gateway = await gateway_factory(direct=direct)
    await sim.post("/_sim/configure", {"resource": "evaluations/e-leave", "rows": 200, "interval": 0.05})
    got = await read_sse(f"{gateway.url}/api/v1/evaluations/e-leave/stream", gateway.headers(),
                         until=lambda r: len(r.events) >= 3)
    assert got.ids == ["1", "2", "3"]
    await wait_for(released(gateway), message="the departed stream to be released")


async def test_drain_says_goodbye_with_a_reconnect_code(sim: Sim, gateway_factory: Any, direct: bool) -> None:
    gateway = await gateway_factory(direct=direct)
    await sim.post("/_sim/configure", {"resource": "evaluations/e-bye", "rows": 200, "interval": 0.05})
    received = Received()
    task = asyncio.create_task(read_sse(f"{gateway.url}/api/v1/evaluations/e-bye/stream", gateway.headers(),
                                        received=received, until=terminal))
    await wait_for(lambda: len(received.events) >= 2, message="stream under way")
    gateway.app.begin_drain()
    await task
    name, data = received.events[-1][1:]
    assert name == "gateway.close"
    close = json.loads(data)
    assert close["code"] == "shutting_down" and close["reconnect"] is True
    assert close["lastEventId"] == received.ids[-1]
    await wait_for(released(gateway), message="streams released")


@pytest.mark.direct_only
async def test_direct_output_ends_a_stream_with_the_last_chunk(sim: Sim, gateway: Gateway) -> None:
    """The detached socket ends a finished stream with chunked encoding's last chunk, then closes.

    h11 (under httpx) raises on a connection that closes inside a chunked body, so reading to
    the end without an error shows the body was complete.
    """
    body = b""
    async with httpx.AsyncClient() as client, client.stream(
        "GET", f"{gateway.url}/api/v1/evaluations/e-chunks/stream", headers=gateway.headers()
    ) as response:
        assert response.headers["connection"] == "close"
        assert response.headers["transfer-encoding"] == "chunked"
        async for chunk in response.aiter_bytes():
            body += chunk
    assert b"event: final\n" in body.rsplit(b"\n\n", 2)[-2]


@pytest.mark.both_loops
async def test_a_client_that_stops_reading_is_cut_off_without_slowing_others(sim: Sim, direct: bool) -> None:
    stream = "evaluations/e-stuck"
    await sim.post("/_sim/configure", {"resource": stream, "rows": 1500, "interval": 0})
    async with gateway_with_small_send_buffers(sim.url, direct=direct, limits={"send_timeout": 0.3}) as gateway:
        parts = urlsplit(gateway.url)
        stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(stuck, (parts.hostname, parts.port))
            request = (f"GET /api/v1/{stream}/stream HTTP/1.1\r\nHost: gw\r\n"
                       f"Authorization: Bearer {gateway.token('stuck')}\r\n\r\n")
            await loop.sock_sendall(stuck, request.encode())
            head = await loop.sock_recv(stuck, 256)
            assert head.startswith(b"HTTP/1.1 200")
            # It never reads again; a fast client gets the whole evaluation meanwhile.
            fast = await read_sse(f"{gateway.url}/api/v1/{stream}/stream", gateway.headers("fast"),
                                  until=terminal, timeout=15)
            assert fast.events[-1][1] == "final"
            assert fast.ids == [str(i) for i in range(1, len(fast.ids) + 1)]
            await wait_for(lambda: metric(gateway, "gateway_slow_consumer_disconnects_total") >= 1,
                           message="the stuck client to be cut off")
            assert metric(gateway, "gateway_closes_total", code="slow_consumer") == 1
            await wait_for(released(gateway), message="streams released")
        finally:
            stuck.close()


async def test_a_stream_starts_with_a_jittered_retry_right_after_its_head(sim: Sim, gateway_factory: Any,
                                                                         direct: bool) -> None:
    gateway = await gateway_factory(direct=direct)
    await sim.post("/_sim/configure", {"resource": "evaluations/e-retry", "rows": 3, "interval": 5})
    parts = urlsplit(gateway.url)
    token = gateway.headers()["Authorization"]
    loop = asyncio.get_running_loop()
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.setblocking(False)
        request = (f"GET /api/v1/evaluations/e-retry/stream HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n\r\n")
        await loop.sock_sendall(sock, request.encode())
        data = b""

        async def has_the_first_chunk() -> bool:
            nonlocal data
            data += await loop.sock_recv(sock, 65536)
            return b"\r\n\r\n" in data and b"\n\n\r\n" in data.split(b"\r\n\r\n", 1)[1]

        await wait_for(has_the_first_chunk, message="the head and the first chunk")
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    size, _, rest = body.partition(b"\r\n")
    first = rest[:int(size, 16)]
    assert first.startswith(b"retry: ") and 1000 <= int(first[7:].strip()) <= 5000
