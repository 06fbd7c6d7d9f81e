"""The browser client library: `/client/gateway-client.js` and its types, served always.

The files live in `gateway/static/client/` (with the `package.json` teams vendor or install
it from) and are read once at startup and served from memory. They are public code and
carry no credentials, so any origin may load them (`Access-Control-Allow-Origin: *`, which
module scripts need across origins); an ETag lets browsers revalidate a cached copy cheaply.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

CLIENT_DIR = Path(__file__).parent.parent / "static" / "client"
#: The files `/client/...` serves, with their media types; anything else is 404.
FILES = {
    "gateway-client.js": "text/javascript; charset=utf-8",
    "gateway-client.d.ts": "application/typescript; charset=utf-8",
}
CACHE_CONTROL = "public, max-age=300"
"""Five minutes: an upgraded gateway's library reaches browsers quickly; the ETag makes rechecks cheap."""

_NOT_FOUND = b'{"error":{"code":"not_found","message":"not found"}}'


class ClientLibrary:
    """Serves the client library's files from memory."""

    def __init__(self, directory: Path = CLIENT_DIR) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        for name in FILES:
            body = (directory / name).read_bytes()
            self.files[name] = (body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    def routes(self) -> list[Route]:
        return [Route("/client/{name}", self._file, methods=["GET"])]

    async def _file(self, request: Request) -> Response:
        name = request.path_params["name"]
        entry = self.files.get(name)
        if entry is None:
            return Response(_NOT_FOUND, status_code=404, media_type="application/json")
        body, etag = entry
        headers = {
            "cache-control": CACHE_CONTROL,
            "etag": etag,
            "x-content-type-options": "nosniff",
            "access-control-allow-origin": "*",
        }
        tags = _etags(request.headers.get("if-none-match", ""))
        if etag in tags or "*" in tags:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=FILES[name], headers=headers)


def _etags(header: str) -> set[str]:
    """The entity tags of an `If-None-Match` header (weak ones compare equal, as RFC 9110 says for GET)."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}
