"""Behind a TLS-terminating proxy: `X-Forwarded-Proto`/`-Host` from a trusted proxy define the gateway's own origin.

From any other peer they are ignored. Unit tests of `own_origin`, then a WebSocket upgrade and a
cookie-authenticated SSE stream against real gateways that trust the loopback proxy or not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from gateway.auth.address import ClientAddress, own_origin
from tests.conftest import Gateway, Sim
from tests.wsclient import ws_client

PUBLIC = "https://gw.example"
FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example"}


def scope(peer: str = "10.0.0.5", scheme: str = "http") -> dict[str, Any]:
    return {"type": "http", "scheme": scheme, "client": (peer, 51000)}


class TestOwnOrigin:
    def test_scheme_and_host_of_the_request_itself(self) -> None:
        assert own_origin(scope(), {"host": "127.0.0.1:8080"}) == "http://127.0.0.1:8080"
        assert own_origin(scope(scheme="wss"), {"host": "gw.example"}) == "https://gw.example"
        # Forwarded headers count only when the caller says the peer is a trusted proxy.
        assert own_origin(scope(), {"host": "127.0.0.1:8080", "x-forwarded-proto": "https",
                                    "x-forwarded-host": "gw.example"}) == "http://127.0.0.1:8080"

    def test_a_trusted_proxy_says_what_the_browser_used(self) -> None:
        headers = {"host": "10.0.0.9:8080", "x-forwarded-proto": "https", "x-forwarded-host": "gw.example"}
        assert own_origin(scope(), headers, forwarded=True) == PUBLIC
        # Proto alone: the proxy kept the Host header.
        assert own_origin(scope(), {"host": "gw.example", "x-forwarded-proto": "HTTPS"}, forwarded=True) == PUBLIC

    def test_the_nearest_proxys_value_wins_and_junk_is_ignored(self) -> None:
        headers = {"host": "gw.example", "x-forwarded-proto": "http, https",
                   "x-forwarded-host": "evil.example, gw.example"}
        assert own_origin(scope(), headers, forwarded=True) == PUBLIC
        for junk in ("gw.example/path", "a b", "user@evil.example", "", "gw.example:99999999"):
            headers = {"host": "gw.example", "x-forwarded-proto": "https", "x-forwarded-host": junk}
            assert own_origin(scope(), headers, forwarded=True) == PUBLIC, junk
        assert own_origin(scope(), {"host": "gw.example", "x-forwarded-proto": "gopher"},
                          forwarded=True) == "http://gw.example"

    def test_default_ports_are_left_out_as_browsers_do(self) -> None:
        assert own_origin(scope(), {"host": "gw.example:443", "x-forwarded-proto": "https"}, forwarded=True) == PUBLIC
        assert own_origin(scope(), {"host": "gw.example:80"}) == "http://gw.example"
        assert own_origin(scope(), {"host": "gw.example:8080"}) == "http://gw.example:8080"
        assert own_origin(scope(), {"host": "[::1]:80"}) == "http://[::1]"
        assert own_origin(scope(), {"host": "[::1]:443"}) == "http://[::1]:443"

    def test_only_peers_in_trusted_proxies_are_believed(self) -> None:
        headers = {"host": "10.0.0.9:8080", **{k.lower(): v for k, v in FORWARDED.items()}}
        assert ClientAddress(["10.0.0.0/8"]).own_origin(scope("10.0.0.5"), headers) == PUBLIC
        assert ClientAddress(["10.0.0.0/8"]).own_origin(scope("203.0.113.9"), headers) == "http://10.0.0.9:8080"
        assert ClientAddress([]).own_origin(scope("10.0.0.5"), headers) == "http://10.0.0.9:8080"
        assert not ClientAddress(["10.0.0.0/8"]).trusts({"type": "http"})  # no peer known


async def gateways(gateway_factory: Callable[..., Any]) -> tuple[Gateway, Gateway]:
    """(trusts the loopback proxy, trusts nobody); neither lists any allowed origin."""
    trusting: Gateway = await gateway_factory(server={"trusted_proxies": ["127.0.0.1/32"]})
    untrusting: Gateway = await gateway_factory()
    return trusting, untrusting


async def test_a_websocket_upgrade_through_a_trusted_tls_proxy(sim: Sim, gateway_factory: Callable[..., Any]) -> None:
    trusting, untrusting = await gateways(gateway_factory)
    async with ws_client(trusting, origin=PUBLIC, additional_headers=FORWARDED) as socket:
        await socket.send(type="ping")
        await socket.until(lambda c: bool(c.of_type("pong")))
    # The same headers from a peer the gateway does not trust are ignored: a foreign origin.
    with pytest.raises(InvalidStatus) as refused:
        async with ws_client(untrusting, origin=PUBLIC, additional_headers=FORWARDED):
            pass
    assert refused.value.response.status_code == 403
    assert b"origin_not_allowed" in refused.value.response.body
    # A trusted proxy that forwards another host does not make PUBLIC the gateway's own.
    with pytest.raises(InvalidStatus) as other:
        async with ws_client(trusting, origin=PUBLIC, additional_headers={**FORWARDED,
                                                                          "X-Forwarded-Host": "other.example"}):
            pass
    assert other.value.response.status_code == 403
    # Without forwarded headers the Host the client used is still the gateway's own origin.
    async with ws_client(untrusting, origin=untrusting.url) as socket:
        await socket.send(type="ping")
        await socket.until(lambda c: bool(c.of_type("pong")))


async def test_cookie_authenticated_sse_through_a_trusted_tls_proxy(sim: Sim,
                                                                     gateway_factory: Callable[..., Any]) -> None:
    trusting, untrusting = await gateways(gateway_factory)
    async with httpx.AsyncClient(timeout=10) as client:
        for gateway, expected in ((trusting, 200), (untrusting, 403)):
            headers = {"Cookie": f"gateway_session={gateway.token('alice')}", "Origin": PUBLIC, **FORWARDED}
            url = f"{gateway.url}/api/v1/evaluations/fwd-1/stream"
            async with client.stream("GET", url, headers=headers) as response:
                assert response.status_code == expected, gateway.config.server.trusted_proxies
                # Same origin as far as the browser knows: no CORS headers either way.
                assert "access-control-allow-origin" not in response.headers
                if expected == 403:
                    await response.aread()
                    assert response.json()["error"]["code"] == "origin_not_allowed"
    failures = untrusting.app.metrics.registry.get_sample_value("gateway_auth_failures_total",
                                                                {"reason": "origin_not_allowed"})
    assert failures == 1
