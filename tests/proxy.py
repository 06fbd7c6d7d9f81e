"""A tiny TCP proxy for tests: put it between a client and a server, then `cut()` the network."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class TCPProxy:
    """Forwards a loopback port to `target`; `cut()` aborts every live connection, like a dropped network."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._live: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: While set, nothing gets through in either direction (and no new connection reaches the target).
        self.partitioned = False
        self._connected = asyncio.Event()
        self._connected.set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.port}"

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        await self._connected.wait()  # during a partition: a SYN into the void, the client waits and times out
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            return
        self._live |= {client_writer, server_writer}
        pipes = [asyncio.create_task(self._pipe(client_reader, server_writer)),
                 asyncio.create_task(self._pipe(server_reader, client_writer))]
        self._tasks.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
                self._tasks.discard(task)
            for writer in (client_writer, server_writer):
                self._live.discard(writer)
                writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if self.partitioned:
                    continue  # lost on the way
                writer.write(data)
                await writer.drain()

    def partition(self) -> None:
        """Drop everything from now on, both ways, as a network partition would (nothing is closed)."""
        self.partitioned = True
        self._connected.clear()

    def heal(self) -> None:
        """The network is back. Connections that lost bytes are cut, as their peers would find out."""
        self.partitioned = False
        self._connected.set()
        self.cut()

    def cut(self) -> int:
        """Abort every live connection on both sides (no FIN, no final bytes); returns how many were cut."""
        writers = list(self._live)
        for writer in writers:
            writer.transport.abort()
        return len(writers) // 2

    async def aclose(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def tcp_proxy(url: str) -> AsyncIterator[tuple[TCPProxy, str]]:
    """A proxy in front of the server at `url` (http://127.0.0.1:PORT); yields it and its own URL."""
    host, _, port = url.removeprefix("http://").partition(":")
    proxy = TCPProxy(host, int(port))
    proxy_url = await proxy.start()
    try:
        yield proxy, proxy_url
    finally:
        await proxy.aclose()
