"""The dashboard's server side: served only when enabled, locked-down headers, offline assets."""

from __future__ import annotations

import re
from typing import Any

import httpx

from gateway.transports.dashboard import ASSETS, STATIC_DIR
from tests.conftest import Gateway, Sim


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
