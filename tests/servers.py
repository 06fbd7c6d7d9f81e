"""Real servers on loopback ports for tests: uvicorn on port 0, in-process or as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import uvicorn

from gateway.transports.direct import DirectHttpProtocol, DirectWebSocketProtocol


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, interval: float = 0.01,
                   message: str = "condition") -> None:
    """Poll `predicate` until it is true or the deadline passes (no sleeps as synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves the test runner's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve(app: Any, sock: socket.socket | None = None, **config: Any) -> AsyncIterator[str]:
    """Run `app` under uvicorn on 127.0.0.1:0 (or on `sock`) in this event loop; yield its base URL."""
    options: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "log_level": "warning", "lifespan": "on",
                               "access_log": False}
    options.update(config)
    server = _QuietServer(uvicorn.Config(app, **options))
    async with _run(server, sock) as url:
        yield url


#: Set by `pytest --plain-asgi`: every server runs uvicorn's stock protocols (no `gateway.direct`), so the
#: stream suites check the plain-ASGI path the gateway takes under any other server.
PLAIN_ASGI = False


@contextlib.asynccontextmanager
async def serve_gateway(app: Any, config: Any, sock: socket.socket | None = None,
                        direct: bool = True) -> AsyncIterator[str]:
    """The gateway served exactly as `gateway serve` serves it (`gateway.server.make_server`: protocols,
    frame limit, pings, keep-alive, backlog, shutdown), on port 0 or on `sock`, in this event loop."""
    from gateway.server import frame_limit, make_server

    server = make_server(app, "127.0.0.1", 0, drain_timeout=config.server.drain_timeout,
                         ws_max_size=frame_limit(config.websocket.max_message_bytes), direct=direct and not PLAIN_ASGI)
    async with _run(server, sock) as url:
        yield url


@contextlib.asynccontextmanager
async def _run(server: uvicorn.Server, sock: socket.socket | None) -> AsyncIterator[str]:
    task = asyncio.create_task(server.serve(sockets=[sock] if sock is not None else None))
    try:
        await wait_for(lambda: server.started or task.done(), timeout=10, message="server start")
        if task.done():
            task.result()
            raise RuntimeError("server exited during startup")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, timeout=15)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def server_protocols(direct: bool = True) -> dict[str, Any]:
    """uvicorn options: the gateway's own protocols (as `gateway serve` runs), or uvicorn's stock ones."""
    if direct and not PLAIN_ASGI:
        return {"http": DirectHttpProtocol, "ws": DirectWebSocketProtocol, "ws_per_message_deflate": False}
    return {"http": "h11", "ws": "websockets-sansio"}


def reserved_socket(port: int = 0) -> socket.socket:
    """A loopback socket bound to `port` (0: one the OS picks), not listening (connections are refused).

    Pass it to `serve(..., sock=)` later to listen on that very port: nothing else can take it
    in between, unlike a port number picked, released and bound again. A given `port` binds a
    stopped server's port again (a restart on the same address).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextlib.contextmanager
def subprocess_server(args: list[str], env: dict[str, str] | None = None,
                      timeout: float = 15.0) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    """Run `python -m gateway ARGS --port-file F` as a child process; yield it and the ports it bound.

    The child listens on whatever port its config says (port 0 in the tests) and reports the port
    it got, so no port is picked, released and bound again.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    with tempfile.TemporaryDirectory() as tmp:
        port_file = os.path.join(tmp, "ports.json")
        proc = subprocess.Popen([sys.executable, "-m", "gateway", *args, "--port-file", port_file], env=full_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not os.path.exists(port_file):
                if proc.poll() is not None:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{out}")
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not start")
                time.sleep(0.02)
            with open(port_file) as handle:
                ports: dict[str, Any] = json.load(handle)
            yield proc, ports
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
