"""The optimization WebSocket (`/ws/optimization`, UPSTREAM.md section 3): many jobs over one socket.

Two tasks per connection: a reader that parses client messages and updates the set of
subscriptions, and the single writer, which flushes queued replies first and then each
subscription's new events. Replies therefore always precede the events they announce
(`subscribed` before the replay). A terminal event ends its subscription silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.sim.optimizations import JobRun
from gateway.sim.state import SimState, StreamStats, is_missing

MAX_PENDING_REPLIES = 256
"""A client that sends this many messages without reading the replies is disconnected (1008)."""
MAX_JOB_ID_LENGTH = 200
DROP_CLOSE_CODE = 1011


def _reply(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


def _error(code: str, message: str, job_id: str | None = None) -> str:
    fields: dict[str, Any] = {"error": {"message": message, "code": code}}
    if job_id is not None:
        fields["jobId"] = job_id
    return _reply("error", **fields)


@dataclass(slots=True)
class _Subscription:
    run: JobRun
    cursor: int
    stats: StreamStats


class OptimizationConnection:
    """One accepted `/ws/optimization` socket and its job subscriptions."""

    def __init__(self, websocket: WebSocket, state: SimState, api_key: str) -> None:
        self._ws = websocket
        self._state = state
        self._api_key = api_key
        self._subs: dict[str, _Subscription] = {}
        self._replies: deque[str] = deque()
        self._wake = asyncio.Event()
        self._close_code: int | None = None
        self._close_reason = ""

    # -- Droppable -------------------------------------------------------------------------------

    def holds(self, resource: str) -> bool:
        return any(sub.run.key == resource for sub in self._subs.values())

    def drop(self, mode: str) -> None:
        self._close(DROP_CLOSE_CODE, "simulated upstream failure")

    # -- lifecycle -------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run reader and writer until either ends; the first to finish cancels the other."""
        ws_stats = self._state.ws_stats
        ws_stats.opened()
        self._state.add_live(self)
        loop = asyncio.get_running_loop()
        tasks = {loop.create_task(self._read()), loop.create_task(self._write())}
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                exc = task.exception()
                if exc is not None and not isinstance(exc, WebSocketDisconnect | OSError | RuntimeError):
                    raise exc
        finally:
            for task in tasks:
                task.cancel()
            self._state.remove_live(self)
            for job_id in list(self._subs):
                self._end(job_id)
            ws_stats.closed()

    def _close(self, code: int, reason: str) -> None:
        if self._close_code is None:
            self._close_code, self._close_reason = code, reason
        self._wake.set()

    def _queue(self, message: str) -> None:
        if len(self._replies) >= MAX_PENDING_REPLIES:
            self._close(1008, "too many unread replies")
            return
        self._replies.append(message)
        self._wake.set()

    def _end(self, job_id: str) -> None:
        sub = self._subs.pop(job_id, None)
        if sub is not None:
            sub.run.timeline.remove_waker(self._wake)
            self._state.release(sub.run.key, self._api_key, self, sub.stats)

    # -- writer ----------------------------------------------------------------------------------

    async def _write(self) -> None:
        ws = self._ws
        while True:
            self._wake.clear()
            if self._close_code is not None:
                with contextlib.suppress(RuntimeError, OSError):
                    await ws.close(self._close_code, self._close_reason)
                return
            while self._replies:
                await ws.send_text(self._replies.popleft())
            for job_id, sub in list(self._subs.items()):
                for event in sub.run.timeline.after(sub.cursor):
                    if self._subs.get(job_id) is not sub or self._close_code is not None:
                        break
                    await ws.send_text(event.message)
                    sub.cursor = event.id
                if self._subs.get(job_id) is sub and sub.run.timeline.finished \
                        and sub.cursor >= len(sub.run.timeline):
                    self._end(job_id)
            if not self._replies and self._close_code is None:
                await self._wake.wait()

    # -- reader ----------------------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            message = await self._ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                raw = message.get("bytes") or b""
                text = raw.decode("utf-8", errors="replace")
            self._handle(text)

    def _handle(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            self._queue(_error("invalid_json", "message is not valid JSON"))
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            self._queue(_error("invalid_message", "message must be a JSON object with a string 'type'"))
            return
        kind = message["type"]
        if kind == "ping":
            self._queue(_reply("pong"))
            return
        if kind not in ("subscribe", "unsubscribe"):
            self._queue(_error("unknown_type", f"unknown message type {kind[:40]!r}"))
            return
        job_id = message.get("jobId")
        if not isinstance(job_id, str) or not job_id or len(job_id) > MAX_JOB_ID_LENGTH \
                or any(c in job_id for c in "/\r\n\0"):
            self._queue(_error("invalid_message", f"{kind} needs a string 'jobId'"))
            return
        if kind == "unsubscribe":
            self._end(job_id)
            self._queue(_reply("unsubscribed", jobId=job_id))
            return
        after = message.get("afterEventId")
        if after is not None and (isinstance(after, bool) or not isinstance(after, int | str)):
            self._queue(_error("invalid_message", "'afterEventId' must be an integer", job_id))
            return
        self._subscribe(job_id, after)

    def _subscribe(self, job_id: str, after: int | str | None) -> None:
        if is_missing(job_id):
            self._queue(_error("not_found", f"optimization job {job_id} not found", job_id))
            return
        resource = f"optimizations/{job_id}"
        if job_id in self._subs or not self._state.claim(resource, self._api_key, self):
            if job_id in self._subs:
                self._state.stats(resource).rejected += 1
            self._queue(_error("stream_already_open",
                               f"job {job_id} is already subscribed for this API key", job_id))
            return
        run = self._state.job(job_id)
        cursor = run.timeline.resume_cursor(after)
        self._subs[job_id] = _Subscription(run, cursor, self._state.stats(resource))
        run.timeline.add_waker(self._wake)
        self._queue(_reply("subscribed", jobId=job_id))
