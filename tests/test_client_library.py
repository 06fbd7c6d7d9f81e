"""The browser client library's files: served always, from memory, with the right headers; packaged sanely."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import httpx

from gateway.transports.client_library import CLIENT_DIR, FILES
from gateway.transports.dashboard import STATIC_DIR
from tests.conftest import Gateway, Sim

ROOT = Path(__file__).resolve().parent.parent


async def test_served_without_the_dashboard_with_public_code_headers(sim: Sim, gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client:
        assert (await client.get(gateway.url + "/")).status_code == 404  # dashboard off (the default)
        for name, media_type in FILES.items():
            response = await client.get(f"{gateway.url}/client/{name}")
            assert response.status_code == 200
            assert response.content == (CLIENT_DIR / name).read_bytes()
            assert response.headers["content-type"] == media_type
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["access-control-allow-origin"] == "*"
            assert response.headers["cache-control"] == "public, max-age=300"
            etag = response.headers["etag"]
            again = await client.get(f"{gateway.url}/client/{name}", headers={"If-None-Match": f'"x", W/{etag}'})
            assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
            for if_none_match, status in (("*", 304), ('"stale"', 200)):
                answer = await client.get(f"{gateway.url}/client/{name}", headers={"If-None-Match": if_none_match})
                assert answer.status_code == status, if_none_match
            head = await client.head(f"{gateway.url}/client/{name}")
            assert head.status_code == 200 and head.content == b""
        assert (await client.get(gateway.url + "/client/gateway-client.js")).headers["content-type"] == (
            "text/javascript; charset=utf-8")
        for bad in ("/client/package.json", "/client/README.md", "/client/..%2Fapp.js", "/client/", "/client/x.js"):
            response = await client.get(gateway.url + bad)
            assert response.status_code == 404, bad
        assert (await client.post(gateway.url + "/client/gateway-client.js")).status_code == 405


async def test_served_with_the_dashboard_too(sim: Sim, gateway_factory: Any) -> None:
    gateway: Gateway = await gateway_factory(dashboard={"enabled": True})
    async with httpx.AsyncClient() as client:
        assert (await client.get(gateway.url + "/client/gateway-client.js")).status_code == 200
        # The dashboard's page loads the library as a module of its own origin (CSP `script-src 'self'`).
        page = await client.get(gateway.url + "/")
        assert '<script type="module" src="/static/app.js"></script>' in page.text
        app = await client.get(gateway.url + "/static/app.js")
        assert 'from "/client/gateway-client.js";' in app.text


def test_package_json_describes_an_installable_dependency_free_module() -> None:
    package = json.loads((CLIENT_DIR / "package.json").read_text())
    assert package["name"] == "@stratix/gateway-client" and package["type"] == "module"
    assert package["types"] == "./gateway-client.d.ts"
    assert package["exports"]["."] == {"types": "./gateway-client.d.ts", "default": "./gateway-client.js"}
    for key in ("dependencies", "peerDependencies", "optionalDependencies", "scripts"):
        assert key not in package, key
    for name in package["files"]:
        assert (CLIENT_DIR / name).is_file(), name
    source = (CLIENT_DIR / "gateway-client.js").read_text()
    version = re.search(r'export const VERSION = "([^"]+)";', source)
    assert version is not None and version.group(1) == package["version"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert package["version"] == pyproject["project"]["version"]


def test_library_imports_nothing_and_loads_nothing_from_elsewhere() -> None:
    for name in ("gateway-client.js", "gateway-client.d.ts"):
        text = (CLIENT_DIR / name).read_text()
        assert not re.search(r"^\s*import\b|\bimport\(|\brequire\(", text, re.MULTILINE), name
        assert not re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[a-z]{2,}", text), name
        for unsafe in ("innerHTML", "eval(", "new Function", "document.write"):
            assert unsafe not in text, (name, unsafe)
    # The dashboard imports the library only, from its own origin.
    imports = re.findall(r'^import .* from "([^"]+)";$', (STATIC_DIR / "app.js").read_text(), re.MULTILINE)
    assert imports == ["/client/gateway-client.js"]
