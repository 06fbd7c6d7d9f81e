"""A canary for `transports.direct`: every uvicorn internal it relies on still exists, as it expects.

`DirectHttpProtocol` and `DirectWebSocketProtocol` subclass uvicorn's protocols and touch
their private state. uvicorn is pinned to the minor series this was written against
(`pyproject.toml`); when that pin moves, this test names what changed before any stream
test fails in an obscure way.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.websockets import websockets_sansio_impl
from uvicorn.server import ServerState

from gateway.transports import direct

SOURCE = Path(direct.__file__)
#: Names of uvicorn's protocol state `direct.py` reads or writes (attributes of `self`), with where they live.
HTTP_STATE = {"cycle", "flow", "headers", "parser", "pipeline", "scope", "server", "client", "server_state",
              "transport"}
HTTP_METHODS = {"on_headers_complete", "_unset_keepalive_if_required", "data_received", "resume_writing",
                "connection_lost", "shutdown"}
CYCLE_STATE = {"response_started", "response_complete", "keep_alive"}
WS_STATE = {"conn", "handshake_complete", "close_sent", "disconnected", "writable", "request", "response",
            "scope", "transport", "queue", "connections", "close_timer", "read_paused", "frames"}
WS_METHODS = {"handle_connect", "stop_keepalive"}


class FakeTransport:
    """Just enough of an asyncio transport for uvicorn's `connection_made`."""

    def get_extra_info(self, name: str) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8080)}.get(name)

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        return None

    def set_write_buffer_limits(self, *args: Any) -> None:
        return None

    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None


async def _app(scope: Any, receive: Any, send: Any) -> None:
    return None


def _self_attributes(cls_name: str) -> set[str]:
    tree = ast.parse(SOURCE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls_name)
    return {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "self"}


def test_uvicorn_is_the_series_direct_was_written_for() -> None:
    assert uvicorn.__version__.startswith("0.54."), uvicorn.__version__


def test_the_module_level_names_direct_imports_exist() -> None:
    assert hasattr(httptools_impl, "HEADER_RE") and hasattr(httptools_impl, "HEADER_VALUE_RE")
    assert inspect.isclass(httptools_impl.HttpToolsProtocol)
    assert inspect.isclass(websockets_sansio_impl.WebSocketsSansIOProtocol)


async def test_the_http_protocol_state_direct_touches_exists() -> None:
    config = Config(app=_app, http=direct.DirectHttpProtocol)
    config.load()
    protocol = direct.DirectHttpProtocol(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(FakeTransport())  # type: ignore[arg-type]
    ours = set(vars(direct.DirectHttpProtocol)) | {"detach"}
    used = _self_attributes("DirectHttpProtocol") - ours
    assert used <= HTTP_STATE | HTTP_METHODS, f"direct.py uses uvicorn names this canary does not list: {used}"
    for name in HTTP_STATE - {"cycle", "scope", "headers"}:
        assert hasattr(protocol, name), f"HttpToolsProtocol has no {name!r}"
    for name in HTTP_METHODS:
        assert callable(getattr(httptools_impl.HttpToolsProtocol, name, None)), name
    assert hasattr(protocol.flow, "write_paused") and hasattr(protocol.server_state, "default_headers")
    cycle_init = inspect.signature(httptools_impl.RequestResponseCycle.__init__)
    assert "keep_alive" in cycle_init.parameters
    source = inspect.getsource(httptools_impl.RequestResponseCycle)
    for name in CYCLE_STATE:
        assert f"self.{name}" in source, f"RequestResponseCycle has no {name!r}"
    assert "self.cycle" in inspect.getsource(httptools_impl.HttpToolsProtocol.on_headers_complete)


async def test_the_websocket_protocol_state_direct_touches_exists() -> None:
    config = Config(app=_app, ws=direct.DirectWebSocketProtocol)
    config.load()
    protocol = direct.DirectWebSocketProtocol(config=config, server_state=ServerState(), app_state={})
    protocol.connection_made(FakeTransport())  # type: ignore[arg-type]
    ours = set(vars(direct.DirectWebSocketProtocol))
    used = _self_attributes("DirectWebSocketProtocol") - ours
    assert used <= WS_STATE | WS_METHODS, f"direct.py uses uvicorn names this canary does not list: {used}"
    for name in WS_STATE - {"scope", "request", "response"}:
        assert hasattr(protocol, name), f"WebSocketsSansIOProtocol has no {name!r}"
    for name in WS_METHODS:
        assert callable(getattr(websockets_sansio_impl.WebSocketsSansIOProtocol, name, None)), name
    assert hasattr(protocol.conn, "extensions") and isinstance(protocol.conn.events, list)
    assert isinstance(protocol.conn.reader.buffer, bytearray)
    # `detach` leaves a stand-in close timer so that the ASGI call's end does not close the socket.
    assert "if self.close_timer is None:" in inspect.getsource(websockets_sansio_impl.WebSocketsSansIOProtocol.run_asgi)
    source = inspect.getsource(websockets_sansio_impl.WebSocketsSansIOProtocol)
    for name in ("scope", "request", "response"):  # set during the handshake, then read by direct.py
        assert f"self.{name} =" in source or f"self.{name}: " in source, f"no {name!r} assigned by uvicorn"
