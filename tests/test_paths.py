"""Paths users meet that no other suite walks: caps, forwarded addresses, resumes at the edges, config keys.

Real gateway and simulator on loopback; each test asserts the documented behaviour (status,
code, `Retry-After`, close code, metric or log line).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.exceptions import InvalidStatus

from gateway.logs import Redactor
from tests.conftest import SECRET, Gateway, Sim, read_sse, terminal
from tests.servers import serve, wait_for
from tests.wsclient import ws_client


def stream_url(gateway: Gateway, stream: str) -> str:
    return f"{gateway.url}/api/v1/{stream}/stream"


async def hold_open(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> httpx.Response:
    return await client.send(client.build_request("GET", url, headers=headers), stream=True)


def limit_rejections(gateway: Gateway, limit: str) -> float:
    return gateway.app.metrics.registry.get_sample_value("gateway_limit_rejections_total", {"limit": limit}) or 0.0


# --- caps --------------------------------------------------------------------------------------------


async def test_the_stream_cap_is_503_over_capacity_on_both_transports(sim_factory: Callable[..., Any],
                                                                       gateway_factory: Callable[..., Any]) -> None:
    sim: Sim = await sim_factory(interval=0.5, rows=100)
    gateway: Gateway = await gateway_factory(sim.url, limits={"max_streams": 1})
    async with httpx.AsyncClient(timeout=10) as client:
        held = await hold_open(client, stream_url(gateway, "evaluations/cap-a"), gateway.headers("alice"))
        try:
            refused = await client.get(stream_url(gateway, "evaluations/cap-b"), headers=gateway.headers("bob"))
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "over_capacity"
            assert refused.headers["retry-after"] == "5"
            async with ws_client(gateway, "carol") as socket:
                await socket.subscribe("evaluations/cap-c")
                await socket.until(lambda c: bool(c.errors()))
                assert socket.errors("evaluations/cap-c") == ["over_capacity"]
                # The stream already open is not another stream: it can be joined.
                await socket.subscribe("evaluations/cap-a")
                await socket.until(lambda c: bool(c.of_type("subscribed", "evaluations/cap-a")))
        finally:
            await held.aclose()
    assert limit_rejections(gateway, "max_streams") == 2


async def test_the_connection_caps_at_the_stream_and_at_the_websocket_upgrade(
        sim_factory: Callable[..., Any], gateway_factory: Callable[..., Any]) -> None:
    sim: Sim = await sim_factory(interval=0.5, rows=100)
    gateway: Gateway = await gateway_factory(sim.url, server={"max_connections": 2, "max_connections_per_ip": 100,
                                                              "max_connections_per_consumer": 100})
    async with httpx.AsyncClient(timeout=10) as client:
        first = await hold_open(client, stream_url(gateway, "evaluations/mc-1"), gateway.headers("u1"))
        async with ws_client(gateway, "u2"):
            try:
                refused = await client.get(stream_url(gateway, "evaluations/mc-3"), headers=gateway.headers("u3"))
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "over_capacity"
                assert refused.headers["retry-after"] == "5"
                with pytest.raises(InvalidStatus) as upgrade:
                    async with ws_client(gateway, "u4"):
                        pass
                assert upgrade.value.response.status_code == 503
            finally:
                await first.aclose()
    assert limit_rejections(gateway, "max_connections") == 2
    gateway2: Gateway = await gateway_factory(sim.url, server={"max_connections_per_consumer": 1})
    async with ws_client(gateway2, "dan"):
        with pytest.raises(InvalidStatus) as per_user:
            async with ws_client(gateway2, "dan"):
                pass
        assert per_user.value.response.status_code == 429
        assert per_user.value.response.headers["retry-after"] == "10"


async def test_forwarded_addresses_count_only_behind_a_trusted_proxy(sim_factory: Callable[..., Any],
                                                                     gateway_factory: Callable[..., Any]) -> None:
    sim: Sim = await sim_factory(interval=0.5, rows=100)
    trusting: Gateway = await gateway_factory(sim.url, server={"trusted_proxies": ["127.0.0.1/32"],
                                                               "max_connections_per_ip": 1})
    untrusting: Gateway = await gateway_factory(sim.url, server={"max_connections_per_ip": 1})
    async with httpx.AsyncClient(timeout=10) as client:
        held = []
        try:
            for i, address in enumerate(("203.0.113.7", "203.0.113.8")):
                headers = {**trusting.headers(f"p{i}"), "X-Forwarded-For": f"{address}, 127.0.0.1"}
                held.append(await hold_open(client, stream_url(trusting, f"evaluations/xff-{i}"), headers))
            assert [r.status_code for r in held] == [200, 200]  # two browsers behind one proxy
            again = {**trusting.headers("p9"), "X-Forwarded-For": "203.0.113.7"}
            refused = await client.get(stream_url(trusting, "evaluations/xff-9"), headers=again)
            assert refused.status_code == 429
            # Without trusted proxies the header is ignored: everyone is the peer, 127.0.0.1.
            spoof = {**untrusting.headers("s1"), "X-Forwarded-For": "198.51.100.1"}
            held.append(await hold_open(client, stream_url(untrusting, "evaluations/xff-a"), spoof))
            spoof2 = {**untrusting.headers("s2"), "X-Forwarded-For": "198.51.100.2"}
            refused = await client.get(stream_url(untrusting, "evaluations/xff-b"), headers=spoof2)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_connections"
        finally:
            for response in held:
                await response.aclose()


# --- WebSocket: the edges -------------------------------------------------------------------------------


async def test_invalid_messages_count_towards_the_policy_close(gateway_factory: Callable[..., Any]) -> None:
    gateway: Gateway = await gateway_factory(websocket={"message_burst": 4, "messages_per_second": 1000})
    async with ws_client(gateway) as socket:
        for bad in ("not json", "[]", '{"type":"nope"}', '{"type":"subscribe"}', '{"type":"subscribe","stream":1}',
                    "{", "{}", "null"):
            await socket.ws.send(bad)
        assert await socket.until_closed() == 4103
    errors = socket.errors()
    assert 4 <= len(errors) < 8 and set(errors) <= {"invalid_json", "invalid_message", "unknown_type", "invalid_stream"}
    invalid = gateway.app.metrics.registry.get_sample_value("gateway_ws_client_messages_total", {"outcome": "invalid"})
    assert invalid is not None and invalid >= 4


async def test_resuming_after_the_end_and_on_a_fresh_gateway_over_websocket(
        sim: Sim, gateway_factory: Callable[..., Any]) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/ws-end", "rows": 6, "interval": 0.01})
    first: Gateway = await gateway_factory()
    async with ws_client(first) as socket:
        await socket.subscribe("evaluations/ws-end")
        await socket.until(lambda c: c.ended("evaluations/ws-end"))
        last = socket.ids("evaluations/ws-end")[-1]
        # After the terminal event: subscribed, then unsubscribed, and no event (SSE answers 204).
        socket.messages.clear()
        await socket.subscribe("evaluations/ws-end", afterEventId=last)
        await socket.until(lambda c: c.ended("evaluations/ws-end"))
        assert [m["type"] for m in socket.messages] == ["subscribed", "unsubscribed"]
    # A freshly started gateway does not know the id yet: it waits for it and resumes right after it.
    await sim.post("/_sim/configure", {"resource": "evaluations/ws-fresh", "rows": 8, "interval": 0.01})
    fresh: Gateway = await gateway_factory()
    async with ws_client(fresh) as socket:
        await socket.subscribe("evaluations/ws-fresh", afterEventId=3)
        await socket.until(lambda c: c.ended("evaluations/ws-fresh"))
    ids = socket.ids("evaluations/ws-fresh")
    assert ids == list(range(4, ids[-1] + 1)) and not socket.errors()


async def test_the_upstream_unavailable_ending_on_websocket(sim: Sim, gateway_factory: Callable[..., Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.upstream.sse_feed import SSEFeed

    async def crash(self: SSEFeed, response: httpx.Response) -> int:
        raise RuntimeError("a bug in the feed")

    monkeypatch.setattr(SSEFeed, "_decode", crash)
    gateway: Gateway = await gateway_factory()
    async with ws_client(gateway) as socket:
        await socket.subscribe("evaluations/ws-crash")
        await socket.until(lambda c: c.ended("evaluations/ws-crash"))
        [error] = [m["error"] for m in socket.of_type("error", "evaluations/ws-crash")]
        assert not socket.closed
    assert error["code"] == "upstream_unavailable" and error["reconnect"] is True


# --- history -----------------------------------------------------------------------------------------------


async def test_an_ended_streams_history_is_forgotten_after_history_ttl(sim: Sim,
                                                                       gateway_factory: Callable[..., Any]) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-ttl", "rows": 3, "interval": 0.01})
    gateway: Gateway = await gateway_factory(limits={"history_ttl": 0.3})
    url = stream_url(gateway, "evaluations/e-ttl")
    first = await read_sse(url, gateway.headers("a"), until=terminal)
    last = first.ids[-1]
    assert last is not None
    # Within history_ttl: a resume after the end is told so (204), served from the kept history.
    assert (await read_sse(url, {**gateway.headers("b"), "Last-Event-ID": last})).status == 204
    await wait_for(lambda: "evaluations/e-ttl" not in gateway.app.hub.topics, timeout=5, message="history dropped")
    connects = (await sim.resource("evaluations/e-ttl"))["connects"]
    again = await read_sse(url, gateway.headers("c"), until=terminal)
    assert again.status == 200 and (await sim.resource("evaluations/e-ttl"))["connects"] == connects + 1


# --- config keys ---------------------------------------------------------------------------------------------


async def test_max_token_bytes_refuses_larger_tokens(sim: Sim, gateway_factory: Callable[..., Any]) -> None:
    gateway: Gateway = await gateway_factory(auth={"jwt": {"algorithms": ["HS256"], "secret": SECRET,
                                                           "max_token_bytes": 512, "leeway": 0}})
    small, large = gateway.token("a"), gateway.token("b", padding="x" * 600)
    assert len(small) < 512 < len(large)
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{gateway.url}/api/v1/evaluations/t1", headers=bearer(small))).status_code == 200
        refused = await client.get(f"{gateway.url}/api/v1/evaluations/t1", headers=bearer(large))
    assert refused.status_code == 401 and refused.json()["error"]["message"] == "token is too large"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_public_key_file_verifies_es256_tokens(sim: Sim, gateway_factory: Callable[..., Any],
                                                     tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "jwt.pub").write_bytes(pem)
    gateway: Gateway = await gateway_factory(auth={"jwt": {"algorithms": ["ES256"],
                                                           "public_key_file": str(tmp_path / "jwt.pub")}})
    good = jwt.encode({"sub": "e", "exp": 4_000_000_000, "streams": ["*/*"]}, key, algorithm="ES256")
    forged = jwt.encode({"sub": "e", "exp": 4_000_000_000, "streams": ["*/*"]},
                        ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{gateway.url}/api/v1/evaluations/k1", headers=bearer(good))).status_code == 200
        refused = await client.get(f"{gateway.url}/api/v1/evaluations/k1", headers=bearer(forged))
    assert refused.status_code == 401 and refused.json()["error"]["message"] == "token signature is invalid"


class JWKS:
    """A JWKS endpoint whose keys a test can change, counting its fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        self.fetches += 1
        body = json.dumps({"keys": self.keys}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


async def test_jwks_cache_ttl_refetches_stale_keys(sim: Sim, gateway_factory: Callable[..., Any]) -> None:
    from jwt.algorithms import ECAlgorithm

    key = ec.generate_private_key(ec.SECP256R1())
    jwks = JWKS()
    jwks.keys = [{**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1", "alg": "ES256"}]
    async with serve(jwks) as url:
        gateway: Gateway = await gateway_factory(auth={"jwt": {
            "algorithms": ["ES256"], "jwks_url": f"{url}/jwks", "audience": "gw", "jwks_cache_ttl": 0.2,
            "jwks_min_refresh_interval": 0.1}})
        token = jwt.encode({"sub": "j", "aud": "gw", "exp": 4_000_000_000, "streams": ["*/*"]}, key,
                           algorithm="ES256", headers={"kid": "k1"})
        async with httpx.AsyncClient() as client:

            async def poll_ok() -> bool:
                answer = await client.get(f"{gateway.url}/api/v1/evaluations/j1", headers=bearer(token))
                return answer.status_code == 200

            assert await poll_ok() and jwks.fetches == 1
            assert await poll_ok() and jwks.fetches == 1  # cached
            # Once stale, the keys are fetched again on the next use.
            await wait_for(lambda: _fetched_again(poll_ok, jwks), timeout=5, message="a refetch of stale keys")


async def _fetched_again(poll_ok: Callable[[], Any], jwks: JWKS) -> bool:
    return bool(await poll_ok()) and jwks.fetches >= 2


async def test_authorize_timeout_denies_a_slow_webhook(sim: Sim, gateway_factory: Callable[..., Any]) -> None:
    release = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"allow": true}'})

    async with serve(slow, timeout_graceful_shutdown=1) as url:
        gateway: Gateway = await gateway_factory(auth={"authorize_url": f"{url}/authorize",
                                                       "authorize_timeout": 0.3})
        started = asyncio.get_running_loop().time()
        async with httpx.AsyncClient(timeout=10) as client:
            refused = await client.get(stream_url(gateway, "evaluations/slow-1"),
                                       headers=gateway.headers(streams=[]))
        elapsed = asyncio.get_running_loop().time() - started
        release.set()
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    assert elapsed < 5  # denied at the timeout, not whenever the webhook answers
    failed = gateway.app.metrics.registry.get_sample_value("gateway_auth_failures_total", {"reason": "webhook_failed"})
    assert failed == 1


async def test_the_optimization_socket_path_and_ping_interval_are_used(sim: Sim,
                                                                       gateway_factory: Callable[..., Any]) -> None:
    seen: list[dict[str, Any]] = []
    gateway: Gateway = await gateway_factory(upstream={"optimization_ws_path": "/custom/jobs", "ws_ping_interval": 7})
    mux = gateway.app.pool.mux
    real = mux._connect

    def record(url: str, **options: Any) -> Any:
        seen.append({"url": url, **options})
        return real(url.replace("/custom/jobs", "/ws/optimization"), **options)  # the simulator's own path

    mux._connect = record
    async with ws_client(gateway) as socket:
        await socket.subscribe("optimizations/job-path")
        await socket.until(lambda c: bool(c.events("optimizations/job-path")))
    assert seen[0]["url"].endswith("/custom/jobs")
    assert seen[0]["ping_interval"] == 7 and seen[0]["ping_timeout"] == 7


# --- logs ----------------------------------------------------------------------------------------------------


def test_the_redactor_replaces_every_configured_secret() -> None:
    redactor = Redactor(["super-secret-api-key", "jwt-signing-secret-" + "x" * 20, "abc"])
    record = logging.LogRecord("gateway", logging.INFO, __file__, 1, "key=%s and %s", (
        "super-secret-api-key", "jwt-signing-secret-" + "x" * 20), None)
    assert redactor.filter(record)
    assert record.getMessage() == "key=[redacted] and [redacted]"
    short = logging.LogRecord("gateway", logging.INFO, __file__, 1, "abc is too short to redact", None, None)
    redactor.filter(short)
    assert short.getMessage() == "abc is too short to redact"
    untouched = logging.LogRecord("gateway", logging.INFO, __file__, 1, "nothing to hide", None, None)
    assert redactor.filter(untouched) and untouched.getMessage() == "nothing to hide"
