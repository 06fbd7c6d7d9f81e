"""One logical gateway stream across any number of HTTP connections.

The gateway keeps upstream ids, so a stream can resume on any gateway process with
`Last-Event-ID`. This module owns that loop: connect, decode frames, resume after a
reconnectable close, a cut or a refused connect, and end at the terminal event, a
204, or a close that says not to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import TracebackType

import httpx
from httpx_sse import EventSource, aconnect_sse

from gateway_client.auth import Credentials
from gateway_client.backoff import Attempts, Backoff
from gateway_client.errors import (
    GatewayResponseError,
    ProtocolError,
    RetriesExhausted,
    StreamClosed,
    error_from_response,
)
from gateway_client.events import CloseNotice, ContinuityLost, Cursor, Event, decode

log = logging.getLogger("gateway_client")


class _Interrupted(Exception):
    """The connection ended before the stream did: a reconnectable close, or a body cut short."""


class EventStream:
    """`async for event in stream`: typed events, each once, in order, until the stream ends.

    Iterating raises `StreamClosed` (a close that says not to reconnect), `AuthError`,
    `GatewayResponseError` (any other refusal that waiting will not fix) or
    `RetriesExhausted`. Use it as an async context manager (or call `aclose`) to release
    the connection when stopping early.
    """

    def __init__(self, http: httpx.AsyncClient, url: str, credentials: Credentials, *, terminal: frozenset[str],
                 backoff: Backoff, after_event_id: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._http = http
        self._url = url
        self._credentials = credentials
        self._terminal = terminal
        self._backoff = backoff
        self._clock = clock
        self._cursor = Cursor(after_event_id)
        self._hint = 0.0
        self._gen = self._run()
        self.reconnects = 0
        """Reconnect attempts made so far (0 while the first connection lasts)."""

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event yielded: pass it as `after_event_id` to resume later."""
        return self._cursor.last_event_id

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[Event, None]:
        attempts = Attempts(self._backoff, self._clock)
        connected = False
        while True:
            retry_after = 0.0
            started = self._clock()
            try:
                async with self._connect(resuming=connected) as source:
                    if source is None:
                        return  # 204: the stream had already ended
                    connected = True
                    async for sse in source.aiter_sse():
                        if sse.retry is not None:
                            self._hint = sse.retry / 1000
                        item = decode(sse.event, sse.data, sse.id)
                        if isinstance(item, CloseNotice):
                            if not item.reconnect:
                                raise StreamClosed(item.code, item.message, item.last_event_id or self.last_event_id,
                                                   item.detail, item.poll, item.reconnect)
                            raise _Interrupted(f"{item.code}: {item.message}")
                        if isinstance(item, ContinuityLost):
                            self._cursor.restart()
                        elif item is None or not self._cursor.accept(item.id):
                            continue
                        attempts.progressed()
                        yield item
                        if item.type in self._terminal:
                            return
                    # No terminal event and no close: the gateway process died, or a proxy hung up.
                    raise _Interrupted("stream ended without a terminal event")
            except GatewayResponseError as exc:
                if not exc.retryable:
                    raise
                failure: Exception = exc
                retry_after = exc.retry_after or 0.0
            except (httpx.TransportError, _Interrupted) as exc:
                failure = exc
            if self._clock() - started >= self._backoff.cap:
                attempts.progressed()  # it had been a healthy connection, however quiet
            # The floor is the latest `retry:` (this connection's included) or the refusal's Retry-After.
            delay = attempts.next_delay(max(self._hint, retry_after))
            if delay is None:
                raise RetriesExhausted(attempts.count, self.last_event_id) from failure
            log.info("stream interrupted (%s); reconnecting in %.2f s after id %s",
                     str(failure) or type(failure).__name__, delay, self.last_event_id)
            await asyncio.sleep(delay)
            self.reconnects += 1

    @contextlib.asynccontextmanager
    async def _connect(self, resuming: bool) -> AsyncIterator[EventSource | None]:
        """Open one connection; yields the event source, or None for 204. Translates refusals."""
        refreshed = False
        while True:
            headers = await self._credentials.headers()
            if self.last_event_id is not None:
                headers["Last-Event-ID"] = self.last_event_id
            async with aconnect_sse(self._http, "GET", self._url, headers=headers) as source:
                response = source.response
                if response.status_code == 200:
                    kind = response.headers.get("content-type", "").partition(";")[0].strip()
                    if kind != "text/event-stream":
                        raise ProtocolError(f"expected text/event-stream, got {kind or 'no content type'!r}")
                    yield source
                    return
                if response.status_code == 204:
                    yield None
                    return
                error = error_from_response(response.status_code, response.headers, await response.aread())
            if error.status == 401 and self._credentials.refreshable and not refreshed:
                refreshed = True  # a token that expired between being fetched and being checked
                continue
            if error.status == 409 and error.code == "stream_already_open" and resuming:
                error.retryable = True  # our own previous connection, not yet noticed gone (reject policy)
            raise error
