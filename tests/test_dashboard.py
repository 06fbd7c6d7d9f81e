"""The dashboard's server side: served only when enabled, locked-down headers, offline assets, listings."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from gateway.auth import Principal
from gateway.authz import Authorizer
from gateway.config import AuthConfig
from gateway.dashboard import ASSETS, STATIC_DIR
from gateway.listing import Listings
from tests.conftest import API_KEY, SECRET, Gateway, Sim


async def test_dashboard_is_off_by_default(sim: Sim, gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client:
        for path in ("/", "/static/app.js", "/static/app.css"):
            assert (await client.get(gateway.url + path)).status_code == 404


async def test_dashboard_page_and_assets(sim: Sim, gateway_factory: Any) -> None:
    gateway: Gateway = await gateway_factory(dashboard={"enabled": True}, auth={"cookie": "team_session"})
    async with httpx.AsyncClient() as client:
        page = await client.get(gateway.url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<meta name="gateway-cookie" content="team_session">' in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.headers["x-frame-options"] == "DENY"
        for name, media_type in ASSETS.items():
            asset = await client.get(f"{gateway.url}/static/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"] == media_type
            assert asset.headers["x-content-type-options"] == "nosniff"
        for bad in ("/static/index.html", "/static/..%2Fapp.py", "/static/nope.js"):
            assert (await client.get(gateway.url + bad)).status_code == 404


def test_assets_load_nothing_from_elsewhere() -> None:
    """Works offline: no CDN, no external font, no absolute URL but the SVG namespace."""
    for name in ("index.html", *ASSETS):
        text = (STATIC_DIR / name).read_text()
        urls = set(re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[a-z]{2,}", text))
        assert urls <= {"http://www.w3.org"}, (name, urls)
        assert "@import" not in text and "innerHTML" not in text and "eval(" not in text


async def test_listings_need_a_token_and_show_only_what_the_token_may_open(sim: Sim, gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client:
        for kind in ("evaluations", "optimizations"):
            refused = await client.get(f"{gateway.url}/api/v1/{kind}")
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_token"
        everything = await client.get(f"{gateway.url}/api/v1/evaluations", headers=gateway.headers())
        assert everything.status_code == 200
        assert [item["id"] for item in everything.json()] == ["eval-demo-1", "eval-demo-2", "eval-fail-1"]
        jobs = await client.get(f"{gateway.url}/api/v1/optimizations", headers=gateway.headers())
        assert [item["id"] for item in jobs.json()] == ["job-demo-1", "job-demo-2"]
        narrow = gateway.headers("erin", streams=["evaluations/eval-demo-*"])
        some = await client.get(f"{gateway.url}/api/v1/evaluations", headers=narrow)
        assert [item["id"] for item in some.json()] == ["eval-demo-1", "eval-demo-2"]
        none = await client.get(f"{gateway.url}/api/v1/optimizations", headers=narrow)
        assert none.status_code == 200 and none.json() == []
        for response in (everything, jobs, some, none):
            assert API_KEY not in response.text and API_KEY not in str(response.headers)
            assert response.headers["cache-control"] == "no-store"


async def test_listing_shapes_are_filtered_or_refused() -> None:
    listings = Listings(admission=None, authorizer=Authorizer(AuthConfig(jwt={"secret": SECRET})), poller=None)  # type: ignore[arg-type]
    principal = Principal("u", {}, 0.0, ("evaluations/a-*",))
    items = [{"id": "a-1"}, {"id": "b-1"}, {"id": "a-../x"}, {"id": "a-2", "status": "success"}, "junk", {"no": 1}]
    assert await listings._visible("evaluations", items, principal) == [{"id": "a-1"},
                                                                        {"id": "a-2", "status": "success"}]
    wrapped = {"evaluations": items, "total": 6}
    assert await listings._visible("evaluations", wrapped, principal) == {
        "evaluations": [{"id": "a-1"}, {"id": "a-2", "status": "success"}], "total": 6}
    assert await listings._visible("evaluations", {"data": [{"id": "b-2"}]}, principal) == {"data": []}
    with pytest.raises(ValueError):
        await listings._visible("evaluations", {"something": "else"}, principal)
