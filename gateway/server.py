"""Running the gateway (and the simulator) under uvicorn, with the shutdown the gateway owns.

On SIGTERM/SIGINT the gateway first drains (readiness fails, every stream is told to
reconnect), then asks uvicorn to stop; uvicorn's graceful-shutdown timeout is the
`server.drain_timeout`, so a stuck client can never hang the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from gateway.transports.direct import DirectHttpProtocol, DirectWebSocketProtocol


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.new_event_loop
    return uvloop.new_event_loop


class ManagedServer(uvicorn.Server):
    """A uvicorn server whose signals are handled by `ServerGroup` instead of by itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def frame_limit(max_message_bytes: int) -> int:
    """The server's own WebSocket message limit for a gateway whose messages may be `max_message_bytes`.

    Above the gateway's limit, so an oversized message still reaches the gateway, which counts
    it and closes with 1009 itself; bounded, so a huge one is refused before it is buffered.
    """
    return max(4 * max_message_bytes, 1 << 16)


def make_server(app: Any, host: str, port: int, *, drain_timeout: float = 10.0, log_level: str = "warning",
                ws_max_size: int = 1 << 16, direct: bool = True) -> ManagedServer:
    """A uvicorn server tuned for long-lived streams (no access log: URLs may carry tokens).

    `direct=False` runs uvicorn's stock protocols (streams then write through ASGI `send`,
    without the `gateway.direct` extension): the same settings otherwise.
    """
    config = uvicorn.Config(
        app, host=host, port=port, http=DirectHttpProtocol if direct else "httptools",
        ws=DirectWebSocketProtocol if direct else "websockets-sansio", lifespan="on",
        access_log=False,
        # Forwarded headers are the gateway's to judge (`server.trusted_proxies`): uvicorn's own handling
        # would trust 127.0.0.1 by default and rewrite the client address before the gateway sees it.
        proxy_headers=False,
        log_config=None, log_level=log_level, timeout_graceful_shutdown=int(drain_timeout) + 1,
        ws_max_size=ws_max_size, ws_ping_interval=20.0, ws_ping_timeout=20.0, timeout_keep_alive=30,
        backlog=4096,
        # Event frames are built once and shared by every socket; per-socket compression would
        # cost CPU and a zlib context per socket for JSON events of a few hundred bytes.
        ws_per_message_deflate=False,
    )
    return ManagedServer(config)


class ServerGroup:
    """Servers that start together and stop together on the first signal."""

    def __init__(self, servers: list[ManagedServer], on_exit: Callable[[], object] | None = None) -> None:
        self.servers = servers
        self.on_exit = on_exit
        self.stopping = False

    def stop(self) -> None:
        if self.stopping:
            for server in self.servers:
                server.force_exit = True
            return
        self.stopping = True
        if self.on_exit is not None:
            self.on_exit()
        for server in self.servers:
            server.should_exit = True

    async def serve(self, started: Callable[[], object] | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        tasks = [loop.create_task(server.serve()) for server in self.servers]
        try:
            if started is not None:
                while not all(s.started for s in self.servers):
                    if any(t.done() for t in tasks):
                        break
                    await asyncio.sleep(0.02)
                if all(s.started for s in self.servers):
                    started()
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if not self.stopping:
                self.stop()
            await asyncio.gather(*tasks)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)


def run(coro_factory: Callable[[], Any]) -> None:
    """Run a coroutine on uvloop when available."""
    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        runner.run(coro_factory())


def bound_port(server: uvicorn.Server) -> int:
    return int(server.servers[0].sockets[0].getsockname()[1])
