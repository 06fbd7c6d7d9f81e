"""The browser WebSocket `/ws`, end to end: simulator → gateway → real `websockets` clients on loopback."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import SECRET, Gateway, Sim, read_sse, terminal
from tests.servers import wait_for
from tests.wsclient import Client, RawClient, gateway_with_small_send_buffers, protocols, ws_client, ws_url

EVAL = "evaluations/e-ws"


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    return gateway.app.metrics.registry.get_sample_value(name, labels or None) or 0.0


def contiguous(ids: list[Any]) -> bool:
    return ids == list(range(1, len(ids) + 1))


def _first_index(client: Client, kind: str, stream: str) -> int:
    return next(i for i, m in enumerate(client.messages) if m["type"] == kind and m.get("stream") == stream)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "send"])
async def test_one_socket_watches_an_evaluation_and_two_jobs(sim_factory: Callable[..., Any],
                                                             gateway_factory: Callable[..., Any], direct: bool) -> None:
    sim: Sim = await sim_factory(job_interval=0.01, iterations=3, rows=5)
    gateway: Gateway = await gateway_factory(sim.url, direct=direct)
    streams = ["evaluations/e-multi", "optimizations/j-multi-a", "optimizations/j-multi-b"]
    async with ws_client(gateway) as client:
        assert client.ws.subprotocol == "gateway.v1"
        await client.subscribe(streams[0])
        await client.send(type="subscribe", jobId="j-multi-a")
        await client.send(type="subscribe", jobId="j-multi-b")
        await client.until(lambda c: all(c.ended(s) for s in streams), what="three streams to end")
    assert [e["eventType"] for e in client.events(streams[0])][-1] == "final"
    for stream in streams:
        assert contiguous(client.ids(stream)), stream
        # `subscribed` comes before the stream's first event, `unsubscribed` after its last.
        assert _first_index(client, "subscribed", stream) < _first_index(client, "event", stream)
        assert client.messages.index(client.of_type("unsubscribed", stream)[0]) > max(
            i for i, m in enumerate(client.messages) if m["type"] == "event" and m["stream"] == stream)
    job_events = client.events(streams[1])
    assert job_events[-1]["eventType"] == "job_complete"
    assert {"iteration", "timestamp", "data"} <= set(job_events[1])
    assert client.of_type("subscribed", streams[1])[0]["jobId"] == "j-multi-a"
    assert all(m["jobId"] == "j-multi-a" for m in client.of_type("event", streams[1]))
    stats = await sim.stats()
    assert stats["ws_connections"]["connects"] == 1
    assert stats["optimizations/j-multi-a"]["connects"] == 1
    assert stats["evaluations/e-multi"]["connects"] == 1
    assert metric(gateway, "gateway_frames_sent_total", transport="ws") == sum(
        len(client.events(s)) for s in streams)


async def test_malformed_messages_get_error_frames_and_the_socket_lives_on(gateway: Gateway) -> None:
    async with ws_client(gateway) as client:
        await client.ws.send("not json")
        await client.ws.send(b"\xff\x00")
        await client.send(type="publish", stream=EVAL)
        await client.send(type="subscribe", stream="users/1")
        await client.send(type="subscribe", stream="evaluations/../etc")
        await client.send(type="subscribe", stream=EVAL, afterEventId=[1])
        await client.send(type="unsubscribe", stream="evaluations/never-subscribed")
        await client.send(type="ping")
        await client.until(lambda c: bool(c.of_type("pong")))
    assert client.errors() == ["invalid_json", "invalid_json", "unknown_type", "invalid_stream", "invalid_stream",
                               "invalid_message"]
    assert client.of_type("error")[-1]["stream"] == EVAL
    assert client.messages[-2] == {"type": "unsubscribed", "stream": "evaluations/never-subscribed"}
    assert metric(gateway, "gateway_ws_client_messages_total", outcome="invalid") == 6
    assert metric(gateway, "gateway_ws_client_messages_total", outcome="accepted") == 2


async def test_oversized_message_closes_with_1009(gateway_factory: Callable[..., Any]) -> None:
    gateway: Gateway = await gateway_factory(websocket={"max_message_bytes": 256})
    async with ws_client(gateway) as client:
        await client.send(type="ping", padding="x" * 200)
        await client.until(lambda c: bool(c.of_type("pong")))
        await client.send(type="ping", padding="x" * 300)
        assert await client.until_closed() == 1009
    assert metric(gateway, "gateway_ws_client_messages_total", outcome="too_large") == 1


async def test_rate_limit_answers_errors_then_closes_persistent_abuse(gateway_factory: Callable[..., Any]) -> None:
    # A rate so low that no token comes back while the test runs, however loaded the machine: the burst is
    # exactly what is answered. Refused messages are answered until their own tolerance (~burst per 10 s) runs out.
    gateway: Gateway = await gateway_factory(websocket={"messages_per_second": 0.001, "message_burst": 3})
    async with ws_client(gateway) as client:
        for _ in range(12):
            await client.send(type="ping")
        assert await client.until_closed() == 4103
    assert len(client.of_type("pong")) == 3
    errors = client.errors()
    assert len(errors) >= 3 and set(errors) == {"rate_limited"}
    assert client.ws.close_reason == "policy_violation"


async def test_subscribe_outside_the_token_streams_claim_is_forbidden_and_opens_nothing(
        sim: Sim, gateway: Gateway) -> None:
    async with ws_client(gateway, streams=["evaluations/*"]) as client:
        await client.send(type="subscribe", jobId="j-secret")
        await client.subscribe("trace-evaluations/t-nope")
        await client.subscribe("evaluations/e-allowed")
        await client.until(lambda c: c.ended("evaluations/e-allowed"))
    assert client.errors("optimizations/j-secret") == ["forbidden"]
    assert client.errors("trace-evaluations/t-nope") == ["forbidden"]
    stats = await sim.stats()
    assert "optimizations/j-secret" not in stats and "trace-evaluations/t-nope" not in stats
    assert stats["ws_connections"]["connects"] == 0
    assert metric(gateway, "gateway_auth_failures_total", reason="forbidden") == 2


async def test_missing_or_bad_token_is_refused_before_the_upgrade(gateway: Gateway) -> None:
    with pytest.raises(InvalidStatus) as missing:
        async with connect(ws_url(gateway), subprotocols=protocols("")[:1], open_timeout=5):
            pass
    assert missing.value.response.status_code == 401
    assert json.loads(missing.value.response.body or b"{}")["error"]["code"] == "missing_token"
    with pytest.raises(InvalidStatus) as bad:
        async with connect(ws_url(gateway), subprotocols=protocols("not.a.jwt"), open_timeout=5):
            pass
    assert bad.value.response.status_code == 401
    # A Bearer header works too (non-browser clients); no subprotocol is then selected.
    async with ws_client(gateway, subprotocols=[],
                         additional_headers={"Authorization": f"Bearer {gateway.token()}"}) as client:
        assert client.ws.subprotocol is None
        await client.send(type="ping")
        await client.until(lambda c: bool(c.of_type("pong")))


async def test_foreign_origin_is_refused_at_the_upgrade(gateway_factory: Callable[..., Any]) -> None:
    gateway: Gateway = await gateway_factory(server={"allowed_origins": ["https://app.example"]})
    with pytest.raises(InvalidStatus) as refused:
        async with ws_client(gateway, origin="https://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    assert gateway.tokens[-1].encode() not in (refused.value.response.body or b"")
    async with ws_client(gateway, origin="https://app.example") as client:
        await client.send(type="ping")
        await client.until(lambda c: bool(c.of_type("pong")))


async def test_after_event_id_resumes_like_last_event_id(sim: Sim, gateway: Gateway) -> None:
    stream = "evaluations/e-ws-resume"
    async with ws_client(gateway) as first:
        await first.subscribe(stream)
        await first.until(lambda c: len(c.events(stream)) >= 7)
        await first.send(type="unsubscribe", stream=stream)
        await first.until(lambda c: c.ended(stream))
    seen = first.ids(stream)
    async with ws_client(gateway) as second, ws_client(gateway, "bob") as third:
        await second.subscribe(stream, afterEventId=seen[-1])
        await third.subscribe(stream, afterEventId="12")
        await second.until(lambda c: c.ended(stream))
        await third.until(lambda c: c.ended(stream))
    assert second.ids(stream)[0] == seen[-1] + 1
    assert contiguous(seen + second.ids(stream))
    assert third.ids(stream)[0] == 13 and third.ids(stream)[-1] == second.ids(stream)[-1]
    # The same position over SSE yields the same ids.
    sse = await read_sse(f"{gateway.url}/api/v1/{stream}/stream", {**gateway.headers("carol"), "Last-Event-ID": "12"},
                         until=terminal)
    assert [int(i) for i in sse.ids if i is not None] == third.ids(stream)


async def test_continuity_lost_is_an_error_frame_before_the_retained_history(
        sim: Sim, gateway_factory: Callable[..., Any]) -> None:
    gateway: Gateway = await gateway_factory(limits={"replay_buffer": 5})
    stream = "evaluations/e-ws-trimmed"
    async with ws_client(gateway) as first:
        await first.subscribe(stream)
        await first.until(lambda c: c.ended(stream))
    last = first.ids(stream)[-1]
    async with ws_client(gateway) as late:
        await late.subscribe(stream, afterEventId=2)
        await late.until(lambda c: c.ended(stream))
    kinds = [m["type"] for m in late.messages]
    assert kinds[:2] == ["subscribed", "error"] and kinds[-1] == "unsubscribed"
    lost = late.of_type("error", stream)[0]["error"]
    retained = late.ids(stream)
    assert lost["code"] == "continuity_lost" and lost["reason"] == "trimmed"
    assert lost["oldestRetainedId"] == retained[0]
    assert retained == list(range(retained[0], last + 1)) and len(retained) <= 6


async def test_one_stream_per_consumer_replace_supersedes_the_older_subscription(gateway: Gateway) -> None:
    stream = "evaluations/e-ws-twice"
    async with ws_client(gateway, "dana") as older, ws_client(gateway, "dana") as newer, \
            ws_client(gateway, "erin") as other:
        await older.subscribe(stream)
        await other.subscribe(stream)
        await older.until(lambda c: len(c.events(stream)) >= 2)
        resume = older.ids(stream)[-1]
        await newer.subscribe(stream, afterEventId=resume)
        await older.until(lambda c: c.ended(stream))
        await newer.until(lambda c: c.ended(stream))
        await other.until(lambda c: c.ended(stream))
        await older.send(type="ping")  # only the subscription ended, not the socket
        await older.until(lambda c: bool(c.of_type("pong")))
    superseded = older.of_type("error", stream)
    assert [e["error"]["code"] for e in superseded] == ["superseded"]
    assert superseded[0]["error"]["reconnect"] is False
    assert superseded[0]["error"]["lastEventId"] == older.ids(stream)[-1]
    assert newer.ids(stream) == list(range(resume + 1, other.ids(stream)[-1] + 1))
    assert other.errors() == [] and contiguous(other.ids(stream))


async def test_one_stream_per_consumer_reject_refuses_the_newcomer_across_transports(
        sim: Sim, gateway_factory: Callable[..., Any]) -> None:
    gateway: Gateway = await gateway_factory(limits={"one_stream_per_consumer": "reject"})
    await sim.post("/_sim/configure", {"resource": "evaluations/e-ws-reject", "rows": 50, "interval": 0.05})
    stream = "evaluations/e-ws-reject"
    async with ws_client(gateway, "fay") as holder, ws_client(gateway, "fay") as newcomer:
        await holder.subscribe(stream)
        await holder.until(lambda c: bool(c.events(stream)))
        await newcomer.subscribe(stream)
        await newcomer.until(lambda c: bool(c.errors(stream)))
        assert newcomer.errors(stream) == ["stream_already_open"]
        sse = await read_sse(f"{gateway.url}/api/v1/{stream}/stream", gateway.headers("fay"))
        assert sse.status == 409
        assert not holder.errors()


async def test_max_subscriptions_per_socket(gateway_factory: Callable[..., Any]) -> None:
    gateway: Gateway = await gateway_factory(websocket={"max_subscriptions": 2})
    async with ws_client(gateway) as client:
        for i in range(3):
            await client.subscribe(f"evaluations/e-cap-{i}")
        await client.until(lambda c: bool(c.errors("evaluations/e-cap-2")))
        await client.send(type="subscribe", stream="evaluations/e-cap-0")
        await client.until(lambda c: len(c.errors()) == 2)
    assert client.errors("evaluations/e-cap-2") == ["too_many_subscriptions"]
    assert client.errors("evaluations/e-cap-0") == ["already_subscribed"]


async def test_inactivity_ends_the_subscription_not_the_socket(sim: Sim, gateway_factory: Callable[..., Any]) -> None:
    gateway: Gateway = await gateway_factory(limits={"inactivity_timeout": 0.4, "heartbeat": 0.1})
    await sim.post("/_sim/configure", {"resource": "evaluations/e-ws-idle", "rows": 3, "interval": 30})
    stream = "evaluations/e-ws-idle"
    async with ws_client(gateway) as client:
        await client.subscribe(stream)
        await client.until(lambda c: c.ended(stream))
        await client.send(type="ping")
        await client.until(lambda c: bool(c.of_type("pong")))
    error = client.of_type("error", stream)[0]["error"]
    assert error["code"] == "inactivity_timeout" and error["reconnect"] is False
    assert error["poll"] == f"/api/v1/{stream}"
    assert metric(gateway, "gateway_closes_total", code="inactivity_timeout") == 1


async def test_token_expiry_closes_the_socket_with_4002(gateway_factory: Any) -> None:
    gateway = await gateway_factory(auth={"jwt": {"algorithms": ["HS256"], "secret": SECRET, "leeway": 0}})
    async with ws_client(gateway, token=gateway.token(ttl=1)) as client:
        await client.subscribe("evaluations/e-ws-expiry")
        assert await client.until_closed(timeout=5) == 4002
    assert client.ws.close_reason == "token_expired"


async def test_drain_closes_every_socket_with_4000(sim: Sim, gateway: Gateway) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-ws-drain", "rows": 100, "interval": 0.05})
    async with ws_client(gateway) as busy, ws_client(gateway, "idle") as idle:
        await busy.subscribe("evaluations/e-ws-drain")
        await busy.until(lambda c: bool(c.events("evaluations/e-ws-drain")))
        await idle.send(type="ping")
        await idle.until(lambda c: bool(c.of_type("pong")))
        gateway.app.begin_drain()
        assert await busy.until_closed(timeout=3) == 4000
        assert await idle.until_closed(timeout=3) == 4000
    with pytest.raises(InvalidStatus) as refused:
        async with ws_client(gateway):
            pass
    assert refused.value.response.status_code == 503


@pytest.mark.both_loops
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "send"])
async def test_slow_client_is_closed_with_4001_without_slowing_a_fast_one(sim: Sim, direct: bool) -> None:
    stream = "optimizations/j-ws-slow"
    await sim.post("/_sim/configure", {"resource": stream, "iterations": 1200, "interval": 0})
    async with gateway_with_small_send_buffers(sim.url, direct=direct,
                                               limits={"send_timeout": 0.3, "heartbeat": 0.2}) as gateway, \
            ws_client(gateway, "fast") as fast, RawClient(ws_url(gateway), gateway.token("slow")) as slow:
        await slow.send(type="subscribe", stream=stream)
        await fast.subscribe(stream)
        await fast.until(lambda c: c.ended(stream), timeout=15, what="the fast client to get the whole job")
        await wait_for(lambda: metric(gateway, "gateway_slow_consumer_disconnects_total") >= 1,
                       message="the stuck client to be cut off")
        assert not fast.closed
        code = await slow.read_until_closed()
    assert code == 4001
    assert fast.errors() == []
    assert contiguous(fast.ids(stream)) and fast.events(stream)[-1]["eventType"] == "job_complete"
    assert len(slow.messages) < len(fast.messages)
    assert metric(gateway, "gateway_closes_total", code="slow_consumer") == 1


@pytest.mark.both_loops
async def test_client_that_never_reads_its_replies_is_closed_as_slow(sim: Sim) -> None:
    """Replies have no hub subscription behind them: their queue is bounded and their sends have a deadline."""
    overrides: dict[str, Any] = {"limits": {"send_timeout": 0.3},
                                 "websocket": {"messages_per_second": 100000, "message_burst": 100000}}
    async with gateway_with_small_send_buffers(sim.url, **overrides) as gateway, \
            RawClient(ws_url(gateway), gateway.token()) as stuck:
        for _ in range(20):
            for _ in range(500):
                stuck.protocol.send_text(b'{"type":"ping"}')
            await stuck.flush()
        await wait_for(lambda: metric(gateway, "gateway_slow_consumer_disconnects_total") >= 1,
                       message="the stuck client to be cut off")
        assert await stuck.read_until_closed() == 4001
    assert len(stuck.messages) < 10000  # cut off long before all its pongs were queued


async def test_servers_without_the_denial_extension_get_an_accept_then_close(gateway: Gateway) -> None:
    """Without `websocket.http.response` a refusal is accept + close 4401/4403 (still nothing opened)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    host = (b"host", gateway.url.removeprefix("http://").encode())
    with_token = (b"sec-websocket-protocol", f"gateway.v1, bearer.{gateway.token()}".encode())
    cases = [([host, (b"sec-websocket-protocol", b"gateway.v1")], 4401),     # no token
             ([host, with_token, (b"origin", b"https://evil.example")], 4403)]  # foreign origin
    for headers, code in cases:
        sent.clear()
        scope = {"type": "websocket", "path": "/ws", "scheme": "ws", "client": ("127.0.0.1", 1),
                 "query_string": b"", "subprotocols": ["gateway.v1"], "headers": headers}
        await gateway.app(scope, receive, send)
        assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
        assert sent[1]["code"] == code
