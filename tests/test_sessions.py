"""Sessions over time (issue 17): token refresh on an open socket, revocation of open streams, honest late joins."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import jwt

from gateway.codec.events import strict_json_loads
from tests.conftest import Gateway, Received, Sim, read_sse, terminal
from tests.servers import serve, wait_for
from tests.wsclient import ws_client


async def test_refresh_moves_the_sockets_expiry_without_reconnecting(sim: Sim,
                                                                      gateway_factory: Callable[..., Any]) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/r-long", "rows": 400, "interval": 0.02})
    gateway: Gateway = await gateway_factory()
    short = gateway.token("alice", ttl=2)
    async with ws_client(gateway, token=short) as socket:
        await socket.subscribe("evaluations/r-long")
        await socket.until(lambda c: len(c.events("evaluations/r-long")) >= 3)
        fresh = gateway.token("alice", ttl=60)
        await socket.send(type="refresh", token=fresh)
        await socket.until(lambda c: bool(c.of_type("refreshed")))
        [reply] = socket.of_type("refreshed")
        assert reply["exp"] == jwt.decode(fresh, options={"verify_signature": False})["exp"]
        # Well past the first token's expiry the socket is open and the stream still flows.
        old_exp = jwt.decode(short, options={"verify_signature": False})["exp"]
        seen = len(socket.events("evaluations/r-long"))
        await wait_for(lambda: time.time() > old_exp + 1.5, timeout=10, message="the old expiry to pass")
        await socket.until(lambda c: len(c.events("evaluations/r-long")) > seen + 5)
        assert not socket.closed


async def test_a_refused_refresh_changes_nothing(sim: Sim, gateway_factory: Callable[..., Any]) -> None:
    gateway: Gateway = await gateway_factory()
    short = gateway.token("alice", ttl=2)
    async with ws_client(gateway, token=short) as socket:
        await socket.send(type="refresh", token="not-a-jwt")
        await socket.send(type="refresh", token=gateway.token("mallory", ttl=600))
        await socket.send(type="refresh", token=gateway.token("alice", ttl=-100))
        await socket.until(lambda c: len(c.errors()) == 3)
        assert socket.errors() == ["refresh_refused"] * 3
        assert socket.of_type("refreshed") == []
        # The socket's expiry is still the first token's: it closes with token_expired.
        assert await socket.until_closed(timeout=8) == 4002


async def test_streams_the_refreshed_token_no_longer_grants_end_as_forbidden(
        sim: Sim, gateway_factory: Callable[..., Any]) -> None:
    for stream in ("evaluations/r-keep", "trace-evaluations/r-drop"):
        await sim.post("/_sim/configure", {"resource": stream, "rows": 400, "interval": 0.05})
    gateway: Gateway = await gateway_factory()
    async with ws_client(gateway, token=gateway.token("alice", streams=["*/*"])) as socket:
        await socket.subscribe("evaluations/r-keep")
        await socket.subscribe("trace-evaluations/r-drop")
        await socket.until(lambda c: bool(c.events("trace-evaluations/r-drop"))
                           and bool(c.events("evaluations/r-keep")))
        await socket.send(type="refresh", token=gateway.token("alice", streams=["evaluations/*"]))
        await socket.until(lambda c: c.ended("trace-evaluations/r-drop"))
        [error] = [m["error"] for m in socket.of_type("error", "trace-evaluations/r-drop")]
        assert error["code"] == "forbidden" and error["reconnect"] is False
        seen = len(socket.events("evaluations/r-keep"))
        await socket.until(lambda c: len(c.events("evaluations/r-keep")) > seen)
        assert not socket.ended("evaluations/r-keep")


class Decider:
    """An authorization webhook whose answers the test changes (or breaks)."""

    def __init__(self) -> None:
        self.allowed: set[str] = set()
        self.broken = False
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.calls += 1
        resource = strict_json_loads(body)["resource"]  # type: ignore[index]
        status, answer = (500, b"{}") if self.broken else (200, b'{"allow": %s}' % (
            b"true" if resource in self.allowed else b"false"))
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": answer})


async def test_revocation_reaches_open_streams_on_both_transports(sim: Sim,
                                                                  gateway_factory: Callable[..., Any]) -> None:
    for stream in ("evaluations/v-sse", "evaluations/v-ws"):
        await sim.post("/_sim/configure", {"resource": stream, "rows": 600, "interval": 0.05})
    decider = Decider()
    decider.allowed = {"evaluations/v-sse", "evaluations/v-ws"}
    async with serve(decider) as url:
        gateway: Gateway = await gateway_factory(auth={"authorize_url": f"{url}/authorize",
                                                       "authorize_cache_ttl": 0, "recheck_interval": 0.3})
        received = Received()
        sse = asyncio.create_task(read_sse(f"{gateway.url}/api/v1/evaluations/v-sse/stream",
                                           gateway.headers("alice", streams=[]), received=received, until=terminal))
        async with ws_client(gateway, token=gateway.token("bob", streams=[])) as socket:
            await socket.subscribe("evaluations/v-ws")
            await socket.until(lambda c: len(c.events("evaluations/v-ws")) >= 2)
            await wait_for(lambda: len(received.ids) >= 2, message="the SSE stream flowing")
            # A webhook that cannot answer revokes nothing.
            decider.broken = True
            calls = decider.calls
            await wait_for(lambda: decider.calls >= calls + 4, message="rechecks against a broken webhook")
            assert not terminal(received) and not socket.ended("evaluations/v-ws")
            # An answer that says no ends both, with access_revoked, not to be retried automatically.
            decider.broken = False
            decider.allowed = set()
            await socket.until(lambda c: c.ended("evaluations/v-ws"))
            got = await asyncio.wait_for(sse, timeout=10)
            [ws_error] = [m["error"] for m in socket.of_type("error", "evaluations/v-ws")]
            assert not socket.closed
    [close] = got.of_type("gateway.close")
    assert close["code"] == "access_revoked" and close["reconnect"] is False
    assert ws_error["code"] == "access_revoked" and ws_error["reconnect"] is False


async def test_a_late_joiner_after_the_history_was_trimmed_is_told(sim: Sim,
                                                                   gateway_factory: Callable[..., Any]) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/late", "rows": 200, "interval": 0.02})
    gateway: Gateway = await gateway_factory(limits={"replay_buffer": 5})
    early = Received()
    first = asyncio.create_task(read_sse(f"{gateway.url}/api/v1/evaluations/late/stream", gateway.headers("early"),
                                         received=early, until=lambda r: len(r.ids) >= 12))
    await first
    late = await read_sse(f"{gateway.url}/api/v1/evaluations/late/stream", gateway.headers("late"),
                          until=lambda r: len(r.ids) >= 3)
    assert late.events[0][1] == "gateway.continuity_lost"
    notice = strict_json_loads(late.events[0][2])
    assert isinstance(notice, dict) and notice["reason"] == "truncated"
    assert notice["oldestRetainedId"] == late.ids[0] and int(late.ids[0] or 0) > 1
    async with ws_client(gateway, "late-ws") as socket:
        await socket.subscribe("evaluations/late")
        await socket.until(lambda c: len(c.events("evaluations/late")) >= 2)
        kinds = [m["type"] for m in socket.messages]
        assert kinds[:3] == ["subscribed", "error", "event"]
        [error] = [m["error"] for m in socket.of_type("error", "evaluations/late")]
        assert error["code"] == "continuity_lost" and error["reason"] == "truncated"
        assert error["oldestRetainedId"] == socket.ids("evaluations/late")[0]
