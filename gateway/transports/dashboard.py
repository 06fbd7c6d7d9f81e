"""The dashboard page: `/` and `/static/{app.js,app.css}`, served only when `dashboard.enabled`.

Plain files from `gateway/static`, read once at startup and served from memory (no file
system access per request, no path to traverse). The page is a reference browser client:
it authenticates with the session cookie only, so a strict Content-Security-Policy and
`Referrer-Policy: no-referrer` keep it from loading or leaking anything off the gateway.
Its `app.js` is a module that imports the browser client library from the same origin
(`/client/gateway-client.js`, served always by `transports.client_library`).
"""

from __future__ import annotations

import html
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

STATIC_DIR = Path(__file__).parent.parent / "static"
#: The assets `/static/...` serves, with their media types; anything else is 404.
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
_COOKIE_PLACEHOLDER = "__GATEWAY_COOKIE__"

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}


class Dashboard:
    """Serves the page; `cookie` is the session cookie name the page stores the token in."""

    def __init__(self, cookie: str | None, static_dir: Path = STATIC_DIR) -> None:
        page = (static_dir / "index.html").read_text(encoding="utf-8")
        self.index = page.replace(_COOKIE_PLACEHOLDER, html.escape(cookie or "", quote=True)).encode()
        self.assets = {name: (static_dir / name).read_bytes() for name in ASSETS}

    def routes(self) -> list[Route]:
        return [Route("/", self._index, methods=["GET"]), Route("/static/{name}", self._asset, methods=["GET"])]

    async def _index(self, request: Request) -> Response:
        return Response(self.index, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    async def _asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = self.assets.get(name)
        if body is None:
            return Response(b'{"error":{"code":"not_found","message":"not found"}}', status_code=404,
                            media_type="application/json")
        return Response(body, media_type=ASSETS[name], headers=SECURITY_HEADERS)
