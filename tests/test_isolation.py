"""What one client, one token or one misbehaving upstream does stays with it (issue 13).

Each test runs a real gateway against the simulator or a scripted hostile upstream on
loopback, attacks it the way a hostile browser or a broken upstream would, and checks
that everyone else's streams carry on untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest

from gateway.codec.events import strict_json_loads
from gateway.upstream.sse_feed import SSEFeed
from tests.conftest import SECRET, Gateway, Received, Sim, read_sse, terminal
from tests.hostile import HostileUpstream, Recorder
from tests.servers import serve, wait_for
from tests.wsclient import ws_client


def stream_url(gateway: Gateway, stream: str = "evaluations/e1") -> str:
    return f"{gateway.url}/api/v1/{stream}/stream"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def open_stream(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> httpx.Response:
    """Start an SSE request and return its response once the head arrived (the body stays unread)."""
    request = client.build_request("GET", url, headers=headers)
    return await client.send(request, stream=True)


# --- what one client sends affects only that client ------------------------------------------------


async def test_unicode_digit_resume_ids_hurt_nobody(sim_factory: Callable[..., Any],
                                                    gateway_factory: Callable[..., Any]) -> None:
    """`'²'.isdigit()` is true and `int('²')` raises: it once closed every viewer of the evaluation."""
    sim: Sim = await sim_factory(interval=0.03, rows=30)
    gateway: Gateway = await gateway_factory(sim.url)
    url = stream_url(gateway, "evaluations/e-uni")
    viewer = Received()
    watching = asyncio.create_task(read_sse(url, gateway.headers("viewer"), until=terminal, timeout=15,
                                            received=viewer))
    async with ws_client(gateway, "ws-viewer") as ws_viewer:
        await ws_viewer.subscribe("evaluations/e-uni")
        await wait_for(lambda: len(viewer.ids) >= 2, message="the viewers to be live")
        async with httpx.AsyncClient(timeout=5) as client:
            # The header as one raw byte (0xB2, '²' in Latin-1), and the same in the query string.
            for headers, query in (({"Last-Event-ID": b"\xb2"}, ""), ({}, "?lastEventId=%C2%B2"),
                                   ({"Last-Event-ID": "12\u0663".encode()}, "")):
                attacker = gateway.headers(f"attacker-{len(query)}-{len(headers)}")
                attacker.update(headers)  # type: ignore[arg-type]
                response = await open_stream(client, url + query, attacker)
                try:
                    assert response.status_code == 200
                    first = b""
                    async with asyncio.timeout(5):
                        async for chunk in response.aiter_bytes():
                            first += chunk
                            if b"}\n\n" in first:  # the first event after the retry frame
                                break
                    # The malformed id is an unknown id: continuity lost, the history from the start.
                    assert b"event: gateway.continuity_lost" in first and b'"reason":"unknown"' in first
                finally:
                    await response.aclose()
        async with ws_client(gateway, "ws-attacker") as attacker_ws:
            await attacker_ws.subscribe("evaluations/e-uni", afterEventId="\u00b2")
            await attacker_ws.until(lambda c: bool(c.errors()), what="the error frame")
            assert attacker_ws.errors("evaluations/e-uni") == ["invalid_message"]
            assert not attacker_ws.closed
        received = await watching
        await ws_viewer.until(lambda c: c.ended("evaluations/e-uni"), what="the WebSocket viewer's end")
        ws_events = ws_viewer.events("evaluations/e-uni")
    ids = viewer.ids
    assert ids == [str(i) for i in range(1, len(ids) + 1)]
    assert received.events[-1][1] == "final"
    assert not received.of_type("gateway.close")
    assert [e["id"] for e in ws_events] == [int(i) for i in ids if i is not None]
    assert not ws_viewer.errors()


# --- a misbehaving upstream ---------------------------------------------------------------------------


async def test_an_endless_upstream_line_fails_its_stream_with_a_reason(gateway_factory: Callable[..., Any]) -> None:
    hostile = HostileUpstream()
    async with serve(hostile) as upstream:
        gateway: Gateway = await gateway_factory(upstream, upstream={"max_event_bytes": 256 << 10})
        received = await read_sse(stream_url(gateway, "evaluations/endless-1"), gateway.headers(),
                                  until=terminal, timeout=10)
        closes = received.of_type("gateway.close")
        assert len(closes) == 1
        assert closes[0]["code"] == "upstream_failed" and closes[0]["reconnect"] is False
        assert "upstream.max_event_bytes" in closes[0]["detail"]
        # Not retried in a loop, and the gateway stopped reading soon after the limit.
        assert hostile.connections["/api/v1/evaluations/endless-1/stream"] == 1
        assert hostile.bytes_sent < 32 << 20


async def test_upstream_nan_and_infinity_reach_browsers_as_json(gateway_factory: Callable[..., Any]) -> None:
    hostile = HostileUpstream()
    async with serve(hostile) as upstream:
        gateway: Gateway = await gateway_factory(upstream)
        received = await read_sse(stream_url(gateway, "evaluations/nan-1"), gateway.headers(), until=terminal)
        datas = [data for _, name, data in received.events if not name.startswith("gateway.")]
        assert [strict_json_loads(d) for d in datas] == [{"score": None, "best": None, "n": 1},
                                                         {"result": {"accuracy": None}}]
        async with ws_client(gateway, "bob") as client:
            await client.subscribe("evaluations/nan-2")
            await client.subscribe("optimizations/nan-job")
            await client.until(lambda c: c.ended("evaluations/nan-2") and bool(c.events("optimizations/nan-job")))
            raw = [json.dumps(m) for m in client.messages]
        for text in raw:
            strict_json_loads(text)
        assert client.events("optimizations/nan-job")[0]["data"] == {"score": None}
        async with httpx.AsyncClient() as http:
            polled = await http.get(f"{gateway.url}/api/v1/evaluations/nan-3", headers=gateway.headers())
            assert polled.status_code == 200
            assert strict_json_loads(polled.content) == {"id": "nan", "accuracy": None, "status": "success"}


async def test_upstream_answers_too_large_or_not_json_are_errors_not_truncations(
        gateway_factory: Callable[..., Any]) -> None:
    hostile = HostileUpstream()
    async with serve(hostile) as upstream:
        gateway: Gateway = await gateway_factory(upstream)
        async with httpx.AsyncClient() as http:
            for resource, code in (("huge-1", "upstream_too_large"), ("text-1", "upstream_error")):
                answer = await http.get(f"{gateway.url}/api/v1/evaluations/{resource}", headers=gateway.headers())
                assert answer.status_code == 502
                assert answer.json()["error"]["code"] == code
        async with ws_client(gateway) as client:
            await client.subscribe("optimizations/huge-job")
            await client.until(lambda c: c.ended("optimizations/huge-job"))
            [error] = [m["error"] for m in client.of_type("error", "optimizations/huge-job")]
        assert error["code"] == "upstream_failed" and "upstream.max_event_bytes" in error["detail"]


async def test_the_api_key_never_follows_a_redirect(gateway_factory: Callable[..., Any],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    async with serve(recorder) as elsewhere:
        hostile = HostileUpstream(redirect_to=f"{elsewhere}/steal", ws_redirect=True)
        async with serve(hostile) as upstream:
            gateway: Gateway = await gateway_factory(upstream)
            caplog.set_level(logging.WARNING, logger="gateway")
            received = await read_sse(stream_url(gateway, "evaluations/redirect-1"), gateway.headers(),
                                      until=terminal)
            [close] = received.of_type("gateway.close")
            assert close["code"] == "upstream_failed" and "302" in close["detail"]
            async with httpx.AsyncClient() as http:
                polled = await http.get(f"{gateway.url}/api/v1/evaluations/redirect-2", headers=gateway.headers())
            assert polled.status_code == 502
            async with ws_client(gateway) as client:
                await client.subscribe("optimizations/job-r")
                await client.until(lambda c: c.ended("optimizations/job-r"))
                assert client.errors("optimizations/job-r") == ["upstream_failed"]
    assert recorder.seen == []
    refused = [r for r in caplog.records if r.getMessage() == "upstream redirect refused"]
    assert len(refused) == 3
    assert {getattr(r, "location_origin", None) for r in refused} == {elsewhere}
    assert {getattr(r, "status", None) for r in refused} == {302}


# --- one user cannot take every stream slot -----------------------------------------------------------


async def test_one_consumer_cannot_take_every_stream(sim_factory: Callable[..., Any],
                                                     gateway_factory: Callable[..., Any]) -> None:
    sim: Sim = await sim_factory(interval=0.5, rows=100)
    gateway: Gateway = await gateway_factory(sim.url, limits={"max_streams_per_consumer": 2})
    token = gateway.token("alice")
    async with httpx.AsyncClient(timeout=10) as client:
        held = [await open_stream(client, stream_url(gateway, f"evaluations/q{i}"), bearer(token)) for i in (1, 2)]
        try:
            assert [r.status_code for r in held] == [200, 200]
            refused = await client.get(stream_url(gateway, "evaluations/q3"), headers=bearer(token))
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_streams"
            assert refused.headers["retry-after"] == "10"
            async with ws_client(gateway, token=token) as alice_ws:
                await alice_ws.subscribe("evaluations/q3")
                # The same stream again (another tab) is not another stream.
                await alice_ws.subscribe("evaluations/q1")
                await alice_ws.until(lambda c: len(c.of_type("error")) + len(c.of_type("subscribed")) >= 2)
                assert alice_ws.errors("evaluations/q3") == ["too_many_streams"]
                assert alice_ws.of_type("subscribed", "evaluations/q1")
            # Someone else is not affected.
            other = await open_stream(client, stream_url(gateway, "evaluations/q3"), gateway.headers("bob"))
            assert other.status_code == 200
            await other.aclose()
        finally:
            for response in held:
                await response.aclose()
        # Closed streams give the slots back.
        await wait_for(lambda: gateway.app.quota.held("alice") == 0, message="alice's slots released")
        again = await open_stream(client, stream_url(gateway, "evaluations/q3"), bearer(token))
        assert again.status_code == 200
        await again.aclose()
    metrics = (await httpx.AsyncClient().get(f"{gateway.url}/metrics")).text
    assert 'gateway_limit_rejections_total{limit="max_streams_per_consumer"} 2.0' in metrics


async def test_refused_streams_release_their_slot_at_once(gateway_factory: Callable[..., Any]) -> None:
    hostile = HostileUpstream()
    async with serve(hostile) as upstream:
        gateway: Gateway = await gateway_factory(upstream, limits={"max_streams": 2, "history_ttl": 300})
        for i in range(6):  # ids the upstream does not know: 404
            received = await read_sse(stream_url(gateway, f"evaluations/missing-{i}"), gateway.headers(f"u{i}"),
                                      until=terminal)
            [close] = received.of_type("gateway.close")
            assert close["code"] == "upstream_failed" and "404" in close["detail"]
        await wait_for(lambda: not gateway.app.hub.topics, message="refused topics dropped")
        # The cap counts live feeds only: a real stream still opens.
        received = await read_sse(stream_url(gateway, "evaluations/nan-ok"), gateway.headers(), until=terminal)
        assert received.status == 200 and received.events[-1][1] == "final"


async def test_a_stream_that_failed_is_retried_for_the_next_subscriber(
        sim_factory: Callable[..., Any], gateway_factory: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sim: Sim = await sim_factory(interval=0.01, rows=10)
    gateway: Gateway = await gateway_factory(sim.url)
    real = SSEFeed._decode
    crashes = [1]

    async def crash_once(self: SSEFeed, response: httpx.Response) -> int:
        if crashes:
            crashes.pop()
            raise RuntimeError("a bug in the feed")
        return await real(self, response)

    monkeypatch.setattr(SSEFeed, "_decode", crash_once)
    first = await read_sse(stream_url(gateway, "evaluations/e-dead"), gateway.headers("alice"), until=terminal)
    [close] = first.of_type("gateway.close")
    assert close["code"] == "upstream_unavailable" and close["reconnect"] is True
    second = await read_sse(stream_url(gateway, "evaluations/e-dead"), gateway.headers("bob"), until=terminal)
    assert second.events[-1][1] == "final" and not second.of_type("gateway.close")
    assert second.ids == [str(i) for i in range(1, len(second.ids) + 1)]
    assert (await sim.resource("evaluations/e-dead"))["connects"] == 2


# --- the authorization webhook --------------------------------------------------------------------------


class SlowWebhook:
    """A webhook that holds every call until released, and counts how many it held at once."""

    def __init__(self) -> None:
        self.calls = 0
        self.active = 0
        self.peak = 0
        self.release = asyncio.Event()
        self.status = 200

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        self.calls += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await self.release.wait()
        finally:
            self.active -= 1
        body = b'{"allow": true}' if self.status == 200 else b'{"error": "boom"}'
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


async def test_the_authorization_webhook_cannot_be_flooded(sim_factory: Callable[..., Any],
                                                           gateway_factory: Callable[..., Any]) -> None:
    sim: Sim = await sim_factory(interval=0.01, rows=2, evaluation_ids=tuple(f"e{i}" for i in range(120)))
    hook = SlowWebhook()
    async with serve(hook) as url:
        gateway: Gateway = await gateway_factory(sim.url, auth={
            "authorize_url": f"{url}/authorize", "authorize_concurrency": 3, "authorize_timeout": 10,
            "authorize_failure_ttl": 60})
        token = gateway.token("mallory", streams=[])
        async with httpx.AsyncClient(timeout=15) as client:
            flood = [asyncio.create_task(client.get(f"{gateway.url}/api/v1/evaluations/f{i}", headers=bearer(token)))
                     for i in range(30)]
            await wait_for(lambda: hook.peak >= 3, message="calls in flight")
            await asyncio.sleep(0)
            assert hook.active <= 3
            hook.release.set()
            answers = await asyncio.gather(*flood)
            assert {a.status_code for a in answers} == {200}
            assert hook.peak == 3
            # A listing asks about a bounded number of items, however many the upstream lists.
            before = hook.calls
            listing = await client.get(f"{gateway.url}/api/v1/evaluations", headers=bearer(token))
            assert listing.status_code == 200
            assert hook.calls - before <= 20
            # Failures are remembered: a broken webhook is not called again for the same decision.
            hook.status = 500
            before = hook.calls
            for _ in range(3):
                refused = await client.get(f"{gateway.url}/api/v1/evaluations/broken", headers=bearer(token))
                assert refused.status_code == 403
            assert hook.calls - before == 1


# --- token hygiene -------------------------------------------------------------------------------------


async def test_streams_end_when_admission_stops_accepting_the_token(sim_factory: Callable[..., Any],
                                                                   gateway_factory: Callable[..., Any]) -> None:
    """No accept-then-close loop: an expired token within `leeway` is accepted, and its stream lives until
    `exp + leeway`, the instant admission stops accepting it."""
    sim: Sim = await sim_factory(interval=1.0, rows=100)
    gateway: Gateway = await gateway_factory(sim.url, auth={"jwt": {"algorithms": ["HS256"], "secret": SECRET,
                                                                     "leeway": 2}})
    token = gateway.token("alice", ttl=0)  # expired already: only the leeway admits it
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    async with ws_client(gateway, token=token) as socket:
        received = await read_sse(stream_url(gateway, "evaluations/e-exp"), bearer(token),
                                  until=lambda r: bool(r.of_type("gateway.close")), timeout=10)
        ended = time.time()
        assert received.status == 200
        assert received.of_type("gateway.close")[0]["code"] == "token_expired"
        assert ended >= exp + 2 - 0.05
        assert await socket.until_closed() == 4002
        assert time.time() >= exp + 2 - 0.05
    # Past exp + leeway, admission refuses it too.
    refused = await read_sse(stream_url(gateway, "evaluations/e-exp"), bearer(token))
    assert refused.status == 401
