"""Every way authentication, authorization and the browser-facing limits can refuse, on real servers."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import API_KEY, SECRET, Gateway, Received, Sim, read_sse, terminal
from tests.servers import serve, wait_for

# --- token factories ----------------------------------------------------------------------


def hs256(claims: dict[str, Any], secret: str = SECRET, headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=headers)


AUD = "stratix-gateway"


def claims(sub: str = "alice", ttl: float = 300, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + int(ttl), "streams": ["*/*"]}
    base.update(extra)
    return base


def unsigned(payload: dict[str, Any]) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{b64(json.dumps(payload).encode())}."


def rsa_pair() -> tuple[rsa.RSAPrivateKey, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return key, public


async def status_of(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as client, client.stream("GET", url, headers=headers or {}) as response:
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return response.status_code, {}
        await response.aread()
        return response.status_code, response.json() if response.content else {}


def stream_url(gateway: Gateway, resource: str = "evaluations/e-sec") -> str:
    return f"{gateway.url}/api/v1/{resource}/stream"


def _server_side(record: logging.LogRecord) -> bool:
    """Log lines of the gateway and its server (the test's own HTTP client logs its URLs by design)."""
    return record.name.startswith(("gateway", "uvicorn"))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- HMAC tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: hs256(claims(ttl=-120)), "expired"),
        (lambda: hs256(claims(nbf=int(time.time()) + 600)), "not yet valid"),
        (lambda: hs256(claims(iat=int(time.time()) + 600)), "not yet valid"),
        (lambda: hs256(claims())[:-6] + "AAAAAA", "signature"),
        (lambda: hs256(claims(), secret="x" * 48), "signature"),
        (lambda: unsigned(claims()), "algorithm"),
        (lambda: hs256({k: v for k, v in claims().items() if k != "exp"}), "claim"),
        (lambda: hs256({k: v for k, v in claims().items() if k != "sub"}), "sub"),
        (lambda: hs256(claims(streams="x" * 9000)), "too large"),
        (lambda: "a.b", "malformed"),
    ],
)
async def test_bad_tokens_get_401_with_a_short_reason(sim: Sim, gateway: Gateway, make: Callable[[], str],
                                                     reason: str) -> None:
    status, body = await status_of(stream_url(gateway), bearer(make()))
    assert status == 401
    assert reason in body["error"]["message"]
    assert len(body["error"]["message"]) < 80
    assert await sim.resource("evaluations/e-sec") in ({}, {"connects": 0})


async def test_leeway_accepts_small_clock_skew(sim: Sim, gateway_factory: Any) -> None:
    gateway = await gateway_factory(auth={"jwt": {"algorithms": ["HS256"], "secret": SECRET, "leeway": 30}})
    skewed = hs256(claims(nbf=int(time.time()) + 10, iat=int(time.time()) + 10))
    got = await read_sse(stream_url(gateway), bearer(skewed), until=terminal)
    assert got.status == 200


async def test_audience_and_issuer_one_of_several(sim: Sim, gateway_factory: Any) -> None:
    gateway = await gateway_factory(auth={"jwt": {"algorithms": ["HS256"], "secret": SECRET,
                                                  "audience": ["web", "mobile"], "issuer": ["idp-a", "idp-b"]}})
    ok = hs256(claims(aud="mobile", iss="idp-b"))
    assert (await status_of(stream_url(gateway, "evaluations/e-aud"), bearer(ok)))[0] == 200
    for bad, reason in ((claims(aud="other", iss="idp-a"), "audience"), (claims(aud="web", iss="evil"), "issuer"),
                        (claims(iss="idp-a"), "claim")):
        status, body = await status_of(stream_url(gateway, "evaluations/e-aud"), bearer(hs256(bad)))
        assert status == 401 and reason in body["error"]["message"], bad


async def test_consumer_claim_is_configurable(sim: Sim, gateway_factory: Any) -> None:
    gateway = await gateway_factory(auth={"jwt": {"algorithms": ["HS256"], "secret": SECRET,
                                                  "consumer_claim": "uid"}})
    assert (await status_of(stream_url(gateway), bearer(hs256(claims(uid="u1")))))[0] == 200
    status, body = await status_of(stream_url(gateway), bearer(hs256(claims())))
    assert status == 401 and "uid" in body["error"]["message"]


# --- public keys and key confusion ----------------------------------------------------------


async def test_rs256_public_key_and_hmac_confusion_refused(sim: Sim, gateway_factory: Any) -> None:
    private, public = rsa_pair()
    gateway = await gateway_factory(auth={"jwt": {"algorithms": ["RS256"], "public_key": public}})
    good = jwt.encode(claims(), private, algorithm="RS256")
    assert (await status_of(stream_url(gateway), bearer(good)))[0] == 200
    # HS256 "signed" with the RS256 public key as the HMAC secret: the classic confusion attack.
    import hmac
    from hashlib import sha256

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims()).encode())}"
    signature = b64(hmac.new(public.encode(), signing_input.encode(), sha256).digest())
    forged = f"{signing_input}.{signature}"
    status, body = await status_of(stream_url(gateway), bearer(forged))
    assert status == 401 and "algorithm" in body["error"]["message"]
    assert (await status_of(stream_url(gateway), bearer(unsigned(claims()))))[0] == 401


class JWKSServer:
    """A real JWKS endpoint whose key set can rotate; counts fetches."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.fetches = 0

    def add(self, kid: str) -> rsa.RSAPrivateKey:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self.keys[kid]

    def app(self) -> Starlette:
        async def jwks(request: Request) -> Response:
            self.fetches += 1
            entries = []
            for kid, key in self.keys.items():
                entry = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
                entry.update({"kid": kid, "alg": "RS256", "use": "sig"})
                entries.append(entry)
            return JSONResponse({"keys": entries})

        return Starlette(routes=[Route("/.well-known/jwks.json", jwks)])


@pytest.fixture
async def jwks() -> AsyncIterator[tuple[JWKSServer, str]]:
    server = JWKSServer()
    async with serve(server.app()) as url:
        yield server, f"{url}/.well-known/jwks.json"


async def test_jwks_kid_selection_rotation_and_unknown_kid(sim: Sim, gateway_factory: Any,
                                                           jwks: tuple[JWKSServer, str]) -> None:
    server, url = jwks
    first = server.add("k1")
    # Keys are generated before anything is timed (a 2048-bit key can take a while on a loaded machine).
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    gateway = await gateway_factory(auth={"jwt": {"algorithms": ["RS256"], "jwks_url": url, "audience": AUD,
                                                  "jwks_min_refresh_interval": 0.3}})
    token = jwt.encode(claims(aud=AUD), first, algorithm="RS256", headers={"kid": "k1"})
    assert (await status_of(stream_url(gateway), bearer(token)))[0] == 200
    assert server.fetches == 1
    # Rotation: a new key appears; a token with its kid triggers one refetch and is accepted.
    second = server.add("k2")
    rotated = jwt.encode(claims(sub="bob", aud=AUD), second, algorithm="RS256", headers={"kid": "k2"})
    # Refetches are rate-limited (0.3 s here), so the new kid is accepted within a bounded time.
    deadline = time.monotonic() + 5
    status = 0
    while time.monotonic() < deadline:
        status, _ = await status_of(stream_url(gateway, "evaluations/e-rot"), bearer(rotated))
        if status == 200:
            break
        await asyncio.sleep(0.1)
    assert status == 200
    fetches = server.fetches
    # Unknown kids are refused, and refetching is rate-limited (no fetch storm).
    forged = jwt.encode(claims(aud=AUD), stranger, algorithm="RS256", headers={"kid": "nope"})
    for _ in range(5):
        status, body = await status_of(stream_url(gateway, "evaluations/e-unk"), bearer(forged))
        assert status == 401 and "key id" in body["error"]["message"]
    assert server.fetches <= fetches + 1
    # A token signed by a stranger but claiming a known kid fails its signature.
    spoofed = jwt.encode(claims(aud=AUD), stranger, algorithm="RS256", headers={"kid": "k1"})
    status, body = await status_of(stream_url(gateway, "evaluations/e-unk"), bearer(spoofed))
    assert status == 401 and "signature" in body["error"]["message"]
    # The audience is required with JWKS: the identity provider's other applications' tokens are refused.
    foreign = jwt.encode(claims(aud="another-app"), first, algorithm="RS256", headers={"kid": "k1"})
    status, body = await status_of(stream_url(gateway, "evaluations/e-aud"), bearer(foreign))
    assert status == 401 and body["error"]["message"] == "token audience is not accepted"
    unaudienced = jwt.encode(claims(), first, algorithm="RS256", headers={"kid": "k1"})
    status, body = await status_of(stream_url(gateway, "evaluations/e-aud"), bearer(unaudienced))
    assert status == 401 and body["error"]["message"] == "token lacks a required claim"


# --- token sources ------------------------------------------------------------------------------


async def test_token_sources_header_cookie_and_query(sim: Sim, gateway_factory: Any,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    off = await gateway_factory()
    token = off.token()
    url = stream_url(off, "evaluations/e-src")
    assert (await status_of(url, {"Cookie": f"gateway_session={token}"}))[0] == 200
    status, body = await status_of(f"{url}?access_token={token}")
    assert status == 401 and body["error"]["code"] == "missing_token"
    on = await gateway_factory(auth={"query_param": "access_token"})
    query_token = on.token(sub="q")
    got = await read_sse(f"{stream_url(on, 'evaluations/e-src')}?access_token={query_token}", until=terminal)
    assert got.status == 200
    server_records = [r for r in caplog.records if _server_side(r)]
    # The gateway did log these requests (at debug level, everything it logs), just never their tokens.
    assert {r.getMessage() for r in server_records} >= {"stream opened", "stream closed", "stream refused"}
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in server_records)
    assert query_token not in logged and token not in logged and API_KEY not in logged


# --- authorization --------------------------------------------------------------------------------


async def test_streams_claim_patterns_allow_and_deny(sim: Sim, gateway: Gateway) -> None:
    token = gateway.token(streams=["evaluations/team-*", "trace-evaluations/t-1"])
    assert (await status_of(stream_url(gateway, "evaluations/team-7"), bearer(token)))[0] == 200
    assert (await status_of(stream_url(gateway, "trace-evaluations/t-1"), bearer(token)))[0] == 200
    for denied in ("evaluations/other", "trace-evaluations/t-2", "optimizations/team-7"):
        status, body = await status_of(stream_url(gateway, denied), bearer(token))
        assert status == 403 and body["error"]["code"] == "forbidden", denied
        assert await sim.resource(denied) in ({}, {"connects": 0})
    assert (await status_of(stream_url(gateway, "evaluations/x"), bearer(gateway.token(streams=[]))))[0] == 403


class Webhook:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = False

    def app(self) -> Starlette:
        async def decide(request: Request) -> Response:
            body = await request.json()
            self.calls.append(body)
            if self.fail:
                return JSONResponse({"error": "boom"}, status_code=500)
            return JSONResponse({"allow": body["resource"].endswith("-ok")})

        return Starlette(routes=[Route("/authorize", decide, methods=["POST"])])


async def test_authorization_webhook_allows_denies_caches_and_fails_closed(sim: Sim, gateway_factory: Any) -> None:
    hook = Webhook()
    async with serve(hook.app()) as url:
        gateway = await gateway_factory(auth={"authorize_url": f"{url}/authorize", "authorize_cache_ttl": 60})
        token = gateway.token(streams=[])
        assert (await status_of(stream_url(gateway, "evaluations/e-ok"), bearer(token)))[0] == 200
        assert (await status_of(stream_url(gateway, "evaluations/e-no"), bearer(token)))[0] == 403
        assert [c["resource"] for c in hook.calls] == ["evaluations/e-ok", "evaluations/e-no"]
        assert hook.calls[0]["consumer"] == "alice" and "claims" in hook.calls[0]
        # Cached: no second call for the same decision.
        assert (await status_of(stream_url(gateway, "evaluations/e-ok"), bearer(token)))[0] == 200
        assert len(hook.calls) == 2
        hook.fail = True
        status, body = await status_of(stream_url(gateway, "evaluations/e2-ok"), bearer(token))
        assert status == 403 and body["error"]["code"] == "forbidden"
    # Webhook down entirely: still closed.
    status, _ = await status_of(stream_url(gateway, "evaluations/e3-ok"), bearer(token))
    assert status == 403
    assert await sim.resource("evaluations/e3-ok") in ({}, {"connects": 0})


# --- one stream per consumer ----------------------------------------------------------------------


async def test_replace_policy_supersedes_the_older_stream(sim: Sim, gateway: Gateway) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-rep", "rows": 50, "interval": 0.05})
    url = stream_url(gateway, "evaluations/e-rep")
    first, other = Received(), Received()
    first_task = asyncio.create_task(read_sse(url, gateway.headers("alice"), received=first, until=terminal))
    other_task = asyncio.create_task(read_sse(url, gateway.headers("bob"), received=other, until=terminal))
    await wait_for(lambda: len(first.events) >= 3 and len(other.events) >= 3, message="both streaming")
    second = Received()
    second_task = asyncio.create_task(read_sse(url, gateway.headers("alice"), received=second,
                                               until=lambda r: len(r.events) >= 5))
    await first_task
    close = json.loads(first.events[-1][2])
    assert first.events[-1][1] == "gateway.close" and close["code"] == "superseded" and close["reconnect"] is False
    await second_task
    assert second.status == 200
    assert not any(e[1] == "gateway.close" for e in other.events)
    other_task.cancel()
    await asyncio.gather(other_task, return_exceptions=True)


async def test_reject_policy_answers_409(sim: Sim, gateway_factory: Any) -> None:
    gateway = await gateway_factory(limits={"one_stream_per_consumer": "reject"})
    await sim.post("/_sim/configure", {"resource": "evaluations/e-rej", "rows": 50, "interval": 0.05})
    url = stream_url(gateway, "evaluations/e-rej")
    first = Received()
    task = asyncio.create_task(read_sse(url, gateway.headers("alice"), received=first, until=terminal))
    await wait_for(lambda: len(first.events) >= 2, message="first stream open")
    status, body = await status_of(url, gateway.headers("alice"))
    assert status == 409 and body["error"]["code"] == "stream_already_open"
    assert (await status_of(url, gateway.headers("bob")))[0] == 200
    assert not any(e[1] == "gateway.close" for e in first.events)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# --- inactivity and token expiry ---------------------------------------------------------------


async def test_inactivity_close_while_heartbeats_flow(sim: Sim, gateway_factory: Any) -> None:
    gateway = await gateway_factory(limits={"inactivity_timeout": 1.0, "heartbeat": 0.2})
    await sim.post("/_sim/configure", {"resource": "evaluations/e-idle", "rows": 1, "interval": 30})
    chunks: list[bytes] = []
    started = time.monotonic()
    async with httpx.AsyncClient() as client, client.stream(
        "GET", stream_url(gateway, "evaluations/e-idle"), headers=gateway.headers()
    ) as response:
        async with asyncio.timeout(10):
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
    elapsed = time.monotonic() - started
    text = b"".join(chunks).decode()
    assert text.count(":\n\n") >= 2, "heartbeats kept flowing"
    assert "event: gateway.close" in text
    close = json.loads(text.split("event: gateway.close\ndata: ")[1].split("\n")[0])
    assert close["code"] == "inactivity_timeout" and close["reconnect"] is False
    assert close["poll"] == "/api/v1/evaluations/e-idle"
    assert 1.0 <= elapsed < 5


async def test_stream_ends_at_token_expiry(sim: Sim, gateway_factory: Any) -> None:
    # No leeway: the stream ends at `exp` (with a leeway it ends at `exp + leeway`, see test_isolation).
    gateway = await gateway_factory(auth={"jwt": {"algorithms": ["HS256"], "secret": SECRET, "leeway": 0}})
    await sim.post("/_sim/configure", {"resource": "evaluations/e-exp", "rows": 100, "interval": 0.05})
    token = hs256(claims(ttl=2))
    got = await read_sse(stream_url(gateway, "evaluations/e-exp"), bearer(token), until=terminal, timeout=8)
    assert got.events[-1][1] == "gateway.close"
    close = json.loads(got.events[-1][2])
    assert close["code"] == "token_expired" and close["reconnect"] is True
    assert close["lastEventId"] == got.ids[-1]


# --- polling -----------------------------------------------------------------------------------------


async def test_polling_coalesces_concurrent_requests(sim: Sim, gateway: Gateway) -> None:
    url = f"{gateway.url}/api/v1/evaluations/e-poll"
    async with httpx.AsyncClient() as client:
        responses = await asyncio.gather(*[client.get(url, headers=gateway.headers(f"u{i}")) for i in range(30)])
        assert {r.status_code for r in responses} == {200}
        assert all(r.json()["id"] == "e-poll" for r in responses)
        stats = await sim.stats()
        assert stats["requests"]["evaluations/e-poll"]["polls"] == 1
        assert (await client.get(url)).status_code == 401
        denied = await client.get(url, headers=gateway.headers(streams=["evaluations/other"]))
        assert denied.status_code == 403
        missing = await client.get(f"{gateway.url}/api/v1/evaluations/missing-9", headers=gateway.headers())
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_polling_honours_upstream_429_without_a_storm(gateway_factory: Any) -> None:
    hits: list[str] = []

    async def limited(request: Request) -> Response:
        hits.append(request.headers.get("x-api-key", ""))
        return JSONResponse({"error": {"message": "slow down", "code": "rate_limited"}}, status_code=429,
                            headers={"Retry-After": "30"})

    upstream = Starlette(routes=[Route("/api/v1/evaluations/{id}", limited)])
    async with serve(upstream) as url:
        gateway = await gateway_factory(sim_url=url, limits={"poll_cache_ttl": 0.1})
        async with httpx.AsyncClient() as client:
            for _ in range(3):
                responses = await asyncio.gather(*[
                    client.get(f"{gateway.url}/api/v1/evaluations/e-429", headers=gateway.headers(f"u{i}"))
                    for i in range(10)])
                assert {r.status_code for r in responses} == {429}
                assert all(r.headers["retry-after"] == "30" for r in responses)
                assert API_KEY not in responses[0].text
    assert hits == [API_KEY]


# --- protecting the gateway ---------------------------------------------------------------------------


async def test_origin_allowlist_for_cookie_auth_and_cors(sim: Sim, gateway_factory: Any) -> None:
    gateway = await gateway_factory(server={"allowed_origins": ["https://app.example.com"]})
    token = gateway.token()
    url = stream_url(gateway, "evaluations/e-cors")
    cookie = {"Cookie": f"gateway_session={token}"}
    status, body = await status_of(url, {**cookie, "Origin": "https://evil.example.net"})
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    async with httpx.AsyncClient() as client:
        async with client.stream("GET", url, headers={**cookie, "Origin": "https://app.example.com"}) as response:
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == "https://app.example.com"
            assert response.headers["access-control-allow-credentials"] == "true"
        preflight = await client.options(url, headers={"Origin": "https://app.example.com",
                                                       "Access-Control-Request-Method": "GET"})
        assert preflight.status_code == 204
        assert "Last-Event-ID" in preflight.headers["access-control-allow-headers"]
        refused = await client.options(url, headers={"Origin": "https://evil.example.net"})
        assert refused.status_code == 403


async def test_connection_caps(sim: Sim, gateway_factory: Any) -> None:
    gateway = await gateway_factory(server={"max_connections_per_consumer": 2, "max_connections_per_ip": 3,
                                            "max_connections": 4})
    for i in range(5):
        await sim.post("/_sim/configure", {"resource": f"evaluations/cap-{i}", "rows": 50, "interval": 0.1})
    opened: list[Received] = []
    tasks = []

    async def open_stream(resource: str, sub: str) -> Received:
        received = Received()
        tasks.append(asyncio.create_task(read_sse(stream_url(gateway, resource), gateway.headers(sub),
                                                  received=received, until=terminal)))
        await wait_for(lambda: received.status is not None, message="stream open")
        opened.append(received)
        return received

    await open_stream("evaluations/cap-0", "alice")
    await open_stream("evaluations/cap-1", "alice")
    status, body = await status_of(stream_url(gateway, "evaluations/cap-2"), gateway.headers("alice"))
    assert status == 429 and body["error"]["code"] == "too_many_connections"
    await open_stream("evaluations/cap-2", "bob")
    status, _ = await status_of(stream_url(gateway, "evaluations/cap-3"), gateway.headers("carol"))
    assert status == 429  # per IP: everyone here is 127.0.0.1
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("bad", ["..", "a%2Fb", "x" * 200, "a%00b", "a%0Ab", "%20"])
async def test_invalid_ids_are_refused_before_upstream(sim: Sim, gateway: Gateway, bad: str) -> None:
    status, body = await status_of(f"{gateway.url}/api/v1/evaluations/{bad}/stream", gateway.headers())
    assert status in (400, 404)
    assert body["error"]["code"] in ("invalid_id", "not_found")
    stats = await sim.stats()
    assert not any(key.startswith("evaluations/") and value.get("connects") for key, value in stats.items()
                   if isinstance(value, dict))


async def test_no_secret_in_any_response_or_log_line(sim: Sim, gateway: Gateway,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    token = gateway.token()
    for resource in ("evaluations/e-scan", "evaluations/eval-fail-3", "evaluations/missing-4"):
        got = await read_sse(stream_url(gateway, resource), bearer(token), until=terminal)
        seen.extend(got.raw)
    async with httpx.AsyncClient() as client:
        for path in ("/api/v1/evaluations/e-scan", "/api/v1/evaluations/missing-4", "/healthz", "/readyz",
                     "/metrics", "/api/v1/evaluations/e-scan/stream", "/api/v1/nope/x/stream"):
            for headers in ({}, bearer(token), bearer(token + "x")):
                response = await client.get(gateway.url + path, headers=headers)
                seen.append(response.text)
                seen.extend(f"{k}: {v}" for k, v in response.headers.items())
    seen.extend(f"{r.getMessage()} {r.__dict__}" for r in caplog.records if _server_side(r))
    for text in seen:
        assert API_KEY not in text
        for issued in gateway.tokens:
            assert issued not in text


async def test_websocket_upgrade_from_a_foreign_origin_is_refused(sim: Sim, gateway_factory: Any) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    gateway = await gateway_factory(server={"allowed_origins": ["https://app.example.com"]})
    url = gateway.url.replace("http://", "ws://", 1) + "/ws"
    token = gateway.token()
    for origin in ("https://evil.example.net", "null"):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, origin=origin, additional_headers=bearer(token)):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 403
    async with connect(url, origin="https://app.example.com", additional_headers=bearer(token)) as ws:  # type: ignore[arg-type]
        await ws.send(json.dumps({"type": "ping"}))
        assert json.loads(await ws.recv())["type"] == "pong"


def _keypair(kind: str) -> tuple[Any, str]:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    private: Any
    if kind == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif kind == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


@pytest.mark.parametrize("algorithm", ["ES256", "PS256", "EdDSA"])
async def test_other_public_key_families(sim: Sim, gateway_factory: Any, algorithm: str) -> None:
    private, public = _keypair(algorithm)
    gateway = await gateway_factory(auth={"jwt": {"algorithms": [algorithm], "public_key": public}})
    good = jwt.encode(claims(), private, algorithm=algorithm)
    assert (await status_of(stream_url(gateway, "evaluations/e-alg"), bearer(good)))[0] == 200
    other, _ = _keypair(algorithm)
    forged = jwt.encode(claims(), other, algorithm=algorithm)
    status, body = await status_of(stream_url(gateway, "evaluations/e-alg"), bearer(forged))
    assert status == 401 and "signature" in body["error"]["message"]
    status, body = await status_of(stream_url(gateway, "evaluations/e-alg"), bearer(hs256(claims())))
    assert status == 401 and "algorithm" in body["error"]["message"]
