"""The detached WebSocket (`transports.ws_socket`): the gateway speaking RFC 6455 on the socket itself.

Real gateway on loopback, real clients: a `websockets` client, and a sans-I/O client over a raw
socket for what a browser would never send (unmasked frames, broken UTF-8) or never fail to
answer (pings).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from websockets.frames import Opcode

from gateway.transports.ws_socket import DetachedWebSocket
from tests.conftest import Gateway, Sim
from tests.servers import wait_for
from tests.wsclient import RawClient, gateway_with_small_send_buffers, ws_client, ws_url

pytestmark = pytest.mark.direct_only
EVAL = "evaluations/e-detached"


def _live(gateway: Gateway) -> int:
    return len(gateway.app.ws.connections)


def _masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    head = bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload)))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _send_raw(client: RawClient, data: bytes) -> None:
    assert client.sock is not None
    await asyncio.get_running_loop().sock_sendall(client.sock, data)


async def test_an_accepted_socket_is_served_detached_and_released_on_close(gateway: Gateway) -> None:
    async with ws_client(gateway) as client:
        await client.subscribe(EVAL)
        await client.until(lambda c: bool(c.events(EVAL)), what="an event")
        (connection,) = gateway.app.ws.connections
        assert isinstance(connection.channel, DetachedWebSocket)
        # uvicorn's protocol object is gone: the server knows the connection as the detached socket.
        assert connection.channel in connection.channel._registry  # type: ignore[operator]
        await client.ws.close()
        assert client.close_code == 1000  # the gateway echoed the client's close
    await wait_for(lambda: _live(gateway) == 0, message="the connection released")
    assert connection.done and not connection.subs
    assert gateway.app.admission.hub.topics.get(EVAL) is None or not gateway.app.admission.hub.topics[EVAL].subscribers


async def test_pings_fragments_and_binary_messages(gateway: Gateway) -> None:
    async with RawClient(ws_url(gateway), gateway.token("alice")) as client:
        await _send_raw(client, _masked(0x9, b"are-you-there"))
        subscribe = json.dumps({"type": "subscribe", "stream": EVAL}).encode()
        # A message in three fragments, with a ping between two of them (control frames may interleave).
        await _send_raw(client, _masked(0x1, subscribe[:10], fin=False) + _masked(0x0, subscribe[10:20], fin=False)
                        + _masked(0x9, b"mid") + _masked(0x0, subscribe[20:]))
        await _send_raw(client, _masked(0x2, json.dumps({"type": "ping"}).encode()))

        async def read() -> bool:
            await client._receive_some(5.0)
            return any(m["type"] == "pong" for m in client.messages) and len(_pongs(client)) == 2

        await wait_for(read, message="both pongs and the answers")
    assert _pongs(client) == [b"are-you-there", b"mid"]
    assert [m["type"] for m in client.messages if m["type"] != "event"][:2] == ["subscribed", "pong"]


def _pongs(client: RawClient) -> list[bytes]:
    return [bytes(frame.data) for frame in client.control if frame.opcode is Opcode.PONG]


@pytest.mark.parametrize(("raw", "code"), [
    (b"\x81\x05hello", 1002),                    # unmasked client frame
    (None, 1007),                                # text that is not UTF-8
    (b"\x83\x80abcd", 1002),                     # reserved opcode
])
async def test_protocol_errors_close_with_their_code(gateway: Gateway, raw: bytes | None, code: int) -> None:
    async with RawClient(ws_url(gateway), gateway.token("alice")) as client:
        await _send_raw(client, raw if raw is not None else _masked(0x1, b"\xff\xfe"))
        assert await client.read_until_closed(5.0) == code
    await wait_for(lambda: _live(gateway) == 0, message="the connection released")
    # Another user's socket is unaffected by one client's broken frames.
    async with ws_client(gateway, "bob") as other:
        await other.send(type="ping")
        await other.until(lambda c: bool(c.of_type("pong")))


async def test_a_client_that_stops_answering_pings_is_dropped(gateway_factory: Callable[..., Any]) -> None:
    gateway: Gateway = await gateway_factory(websocket={"ping_interval": 0.3, "ping_timeout": 0.3})
    async with RawClient(ws_url(gateway), gateway.token("alice")) as silent:
        await wait_for(lambda: _live(gateway) == 1, message="the socket accepted")
        # It never reads, so it never answers: dropped after about interval + timeout.
        await wait_for(lambda: _live(gateway) == 0, timeout=5, message="the silent client dropped")
        assert silent.sock is not None


async def test_a_client_that_answers_pings_stays(gateway_factory: Callable[..., Any]) -> None:
    gateway: Gateway = await gateway_factory(websocket={"ping_interval": 0.2, "ping_timeout": 0.2})
    async with RawClient(ws_url(gateway), gateway.token("alice")) as client:
        async def answered_three() -> bool:
            await client._receive_some(5.0)
            await client.flush()  # the sans-I/O client queued a pong for each ping
            return sum(frame.opcode is Opcode.PING for frame in client.control) >= 3

        await wait_for(answered_three, timeout=10, message="three pings answered")
        assert _live(gateway) == 1 and client.protocol.close_rcvd is None


async def test_a_ping_flood_from_a_client_that_does_not_read_stays_bounded(sim: Sim) -> None:
    async with (gateway_with_small_send_buffers(sim.url) as gateway,
                RawClient(ws_url(gateway), gateway.token("mallory"), receive_buffer=4096) as flooder):
        (connection,) = gateway.app.ws.connections
        transport = connection.channel.transport  # type: ignore[attr-defined]
        ping = _masked(0x9, b"x" * 125)
        for _ in range(40):
            await _send_raw(flooder, ping * 100)  # 4,000 pings of 125 bytes, never reading a pong
        await wait_for(lambda: connection.channel.paused, message="the socket to fill")
        # The pongs stop at the high-water mark instead of buffering ~0.5 MB for a client that never reads.
        assert transport.get_write_buffer_size() < 256 * 1024
        async with ws_client(gateway, "bob") as other:
            await other.send(type="ping")
            await other.until(lambda c: bool(c.of_type("pong")))
