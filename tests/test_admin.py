"""The operators' API (`/admin/*`) on a real gateway and simulator: off by default, the key, what it shows, DELETE."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, Received, Sim, read_sse, terminal
from tests.servers import wait_for
from tests.wsclient import ws_client

ADMIN_KEY = "adm_" + "Q7x" * 12  # 40 characters, unlike any other secret of the test config
EVAL = "evaluations/adm-1"
JOB = "optimizations/job-adm"


async def admin(gateway: Gateway, method: str, path: str, key: str | None = ADMIN_KEY,
                headers: dict[str, str] | None = None) -> httpx.Response:
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.request(method, gateway.url + path, headers=sent)


def sample(gateway: Gateway, name: str, **labels: str) -> float:
    return gateway.app.metrics.registry.get_sample_value(name, labels) or 0.0


async def with_admin(gateway_factory: Callable[..., Any], **overrides: Any) -> Gateway:
    gateway: Gateway = await gateway_factory(admin={"api_key": ADMIN_KEY}, **overrides)
    return gateway


async def test_the_admin_api_is_off_unless_a_key_is_configured(sim: Sim, gateway: Gateway) -> None:
    for method, path in (("GET", "/admin/streams"), ("GET", f"/admin/streams/{EVAL}"),
                         ("DELETE", f"/admin/streams/{EVAL}")):
        response = await admin(gateway, method, path)
        assert response.status_code == 404, (method, path)
        assert response.json()["error"]["code"] == "not_found"
    assert sample(gateway, "gateway_auth_failures_total", reason="admin_unauthorized") == 0


async def test_every_admin_request_needs_the_admin_key(sim: Sim, gateway_factory: Callable[..., Any]) -> None:
    gateway = await with_admin(gateway_factory, server={"allowed_origins": ["https://app.example.com"]})
    origin = {"Origin": "https://app.example.com"}
    refusals = [
        await admin(gateway, "GET", "/admin/streams", key=None, headers=origin),
        await admin(gateway, "GET", "/admin/streams", key=ADMIN_KEY + "x"),
        await admin(gateway, "GET", "/admin/streams", key=ADMIN_KEY[:-1]),
        await admin(gateway, "DELETE", f"/admin/streams/{EVAL}", key=gateway.token("alice")),  # a session token
        await admin(gateway, "GET", "/admin/streams", key=None, headers={"Authorization": f"Basic {ADMIN_KEY}"}),
        await admin(gateway, "GET", "/admin/nothing-here", key=None),  # unknown paths are no hint either
        await admin(gateway, "OPTIONS", "/admin/streams", key=None, headers={
            **origin, "Access-Control-Request-Method": "DELETE"}),
    ]
    for response in refusals:
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["cache-control"] == "no-store"
        assert not any(name.startswith("access-control-") for name in response.headers)
    assert sample(gateway, "gateway_auth_failures_total", reason="admin_unauthorized") == len(refusals)
    # Browsers' session cookies are not admin keys either.
    cookie = await admin(gateway, "GET", "/admin/streams", key=None,
                         headers={**origin, "Cookie": f"gateway_session={gateway.token('alice')}"})
    assert cookie.status_code == 401
    allowed = await admin(gateway, "GET", "/admin/streams", headers=origin)
    assert allowed.status_code == 200 and allowed.json() == {"streams": []}
    assert allowed.headers["cache-control"] == "no-store"
    assert not any(name.startswith("access-control-") for name in allowed.headers)
    assert (await admin(gateway, "GET", "/admin/elsewhere")).status_code == 404
    assert (await admin(gateway, "POST", "/admin/streams")).status_code == 405


async def test_streams_are_listed_with_subscribers_upstream_state_and_last_event(
        sim: Sim, gateway_factory: Callable[..., Any]) -> None:
    await sim.post("/_sim/configure", {"resource": EVAL, "rows": 400, "interval": 0.05})
    await sim.post("/_sim/configure", {"resource": JOB, "iterations": 200, "interval": 0.05})
    gateway = await with_admin(gateway_factory)
    received = Received()
    sse = asyncio.create_task(read_sse(f"{gateway.url}/api/v1/{EVAL}/stream", gateway.headers("alice"),
                                       received=received, until=terminal, timeout=30))
    try:
        async with ws_client(gateway, "bob") as socket:
            await socket.subscribe(EVAL)
            await socket.subscribe(JOB)
            await socket.until(lambda c: len(c.events(EVAL)) >= 2 and len(c.events(JOB)) >= 1)
            await wait_for(lambda: len(received.ids) >= 2, message="the SSE stream flowing")
            listing = await admin(gateway, "GET", "/admin/streams")
            assert listing.status_code == 200
            streams = {entry["stream"]: entry for entry in listing.json()["streams"]}
            assert set(streams) == {EVAL, JOB}
            evaluation = streams[EVAL]
            assert evaluation["subscribers"] == {"sse": 1, "ws": 1}
            assert evaluation["upstream"]["state"] == "open" and evaluation["upstream"]["attempt"] == 0
            assert evaluation["kind"] == "evaluations" and evaluation["id"] == "adm-1"
            assert int(evaluation["last_event_id"]) >= int(received.ids[1] or 0)
            assert 0 <= evaluation["last_event_age_seconds"] < 5
            assert evaluation["ended"] is False and evaluation["end_code"] is None
            job = streams[JOB]
            assert job["subscribers"] == {"sse": 0, "ws": 1}
            assert job["upstream"]["state"] == "subscribed"
            assert job["upstream"]["connection"]["state"] == "open"
            one = await admin(gateway, "GET", f"/admin/streams/{EVAL}")
            assert one.status_code == 200 and one.json()["stream"] == EVAL
            assert one.json()["subscribers"] == {"sse": 1, "ws": 1}
            missing = await admin(gateway, "GET", "/admin/streams/evaluations/nobody-watches")
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
            assert (await admin(gateway, "GET", "/admin/streams/widgets/x")).status_code == 404
            assert (await admin(gateway, "DELETE", "/admin/streams/evaluations/nobody-watches")).status_code == 404
    finally:
        sse.cancel()
        await asyncio.gather(sse, return_exceptions=True)


async def test_delete_ends_the_stream_everywhere_and_closes_its_upstream(
        sim: Sim, gateway_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await sim.post("/_sim/configure", {"resource": EVAL, "rows": 400, "interval": 0.05})
    gateway = await with_admin(gateway_factory)
    received = Received()
    sse = asyncio.create_task(read_sse(f"{gateway.url}/api/v1/{EVAL}/stream", gateway.headers("alice"),
                                       received=received, until=terminal, timeout=30))
    async with ws_client(gateway, "bob") as socket:
        await socket.subscribe(EVAL)
        await socket.until(lambda c: len(c.events(EVAL)) >= 2)
        await wait_for(lambda: len(received.ids) >= 2, message="the SSE stream flowing")
        assert (await sim.resource(EVAL))["open"] == 1
        ended = await admin(gateway, "DELETE", f"/admin/streams/{EVAL}")
        assert ended.status_code == 200
        assert ended.json() == {"stream": EVAL, "terminated": True, "subscribers": 2}
        await socket.until(lambda c: c.ended(EVAL), what="the subscription's end")
        got = await asyncio.wait_for(sse, timeout=10)
        [ws_error] = [m["error"] for m in socket.of_type("error", EVAL)]
        assert not socket.closed  # one subscription ended, not the socket
    [close] = got.of_type("gateway.close")
    assert close["code"] == "terminated" and close["reconnect"] is False
    assert close["lastEventId"] == got.ids[-1]
    assert ws_error["code"] == "terminated" and ws_error["reconnect"] is False

    async def upstream_closed() -> bool:
        return bool((await sim.resource(EVAL))["open"] == 0)

    await wait_for(upstream_closed, message="the upstream connection to close")
    assert (await admin(gateway, "GET", f"/admin/streams/{EVAL}")).status_code == 404
    assert sample(gateway, "gateway_closes_total", code="terminated") == 2
    assert sample(gateway, "gateway_upstream_streams", kind="evaluations") == 0
    # Whoever comes next gets a fresh stream from the start, not the operator's ending.
    later = await read_sse(f"{gateway.url}/api/v1/{EVAL}/stream", gateway.headers("carol"),
                           until=lambda r: len(r.ids) >= 3)
    assert later.ids[:3] == ["1", "2", "3"] and not later.of_type("gateway.close")
    assert not later.of_type("gateway.continuity_lost")
    assert (await sim.resource(EVAL))["connects"] == 2
    [line] = [r for r in caplog.records if r.getMessage() == "admin stream terminated"]
    assert line.__dict__["stream_kind"] == "evaluations" and line.__dict__["subscribers"] == 2


async def test_the_admin_key_never_reaches_a_log_line(sim: Sim, gateway_factory: Callable[..., Any],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gateway = await with_admin(gateway_factory)
    assert ADMIN_KEY in gateway.config.secrets()  # the log redactor's list
    await sim.post("/_sim/configure", {"resource": EVAL, "rows": 400, "interval": 0.05})
    got = asyncio.create_task(read_sse(f"{gateway.url}/api/v1/{EVAL}/stream", gateway.headers("alice"),
                                       until=terminal, timeout=30))
    await wait_for(lambda: EVAL in gateway.app.hub.topics, message="the stream to open")
    for key in (ADMIN_KEY, ADMIN_KEY + "x", ADMIN_KEY[:20]):
        await admin(gateway, "GET", "/admin/streams", key=key)
        await admin(gateway, "GET", f"/admin/streams/{EVAL}?key={key}", key=key)
    assert (await admin(gateway, "DELETE", f"/admin/streams/{EVAL}")).status_code == 200
    await asyncio.wait_for(got, timeout=10)
    lines = [f"{r.getMessage()} {r.__dict__}" for r in caplog.records if r.name.startswith(("gateway", "uvicorn"))]
    assert any("admin request refused" in line for line in lines)
    assert any("admin stream terminated" in line for line in lines)
    for line in lines:
        assert ADMIN_KEY[:20] not in line


@pytest.fixture
def redis() -> Iterator[Any]:
    """A real redis-server (requested before the gateways, so it outlives them)."""
    from tests.test_redis import RedisServer

    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.requires("redis-server")
async def test_with_redis_each_replica_names_the_one_holding_the_upstream(
        redis: Any, sim: Sim, gateway_factory: Callable[..., Any]) -> None:
    from tests.test_redis import LEASE_TTL

    await sim.post("/_sim/configure", {"resource": EVAL, "rows": 400, "interval": 0.05})
    broker = {"kind": "redis", "url": redis.url, "key_prefix": "adm:", "lease_ttl": LEASE_TTL}
    nodes = [await with_admin(gateway_factory, broker=broker) for _ in range(2)]
    seen = [Received(), Received()]
    tasks = [asyncio.create_task(read_sse(f"{node.url}/api/v1/{EVAL}/stream", node.headers(f"user-{i}"),
                                          received=seen[i], until=terminal, timeout=30))
             for i, node in enumerate(nodes)]
    try:
        await wait_for(lambda: all(len(r.ids) >= 2 for r in seen), message="both replicas streaming")
        views = []
        for node in nodes:
            [entry] = (await admin(node, "GET", "/admin/streams")).json()["streams"]
            views.append(entry["upstream"])
        ids = [node.app.shared.replica_id for node in nodes if node.app.shared is not None]
        assert len(ids) == 2 and [v["replica"] for v in views] == ids
        [holder] = [v for v in views if v["holds_lease"]]
        [other] = [v for v in views if v is not holder]
        assert holder["state"] == "open" and holder["holder"] == holder["replica"]
        assert other["state"] == "remote" and other["holder"] == holder["replica"]
        assert (await sim.resource(EVAL))["connects"] == 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
