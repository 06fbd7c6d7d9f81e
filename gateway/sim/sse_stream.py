"""The evaluation SSE endpoint: replay after `Last-Event-ID`, then live events, heartbeats and limits.

A raw ASGI app rather than a StreamingResponse because the simulator must be able to end a
response the ways a real upstream does: cleanly after a terminal event or after inactivity,
with a clean but premature end of body ("eof" drop), or by aborting the connection mid-body
("abort" drop, which uvicorn turns into a closed socket and one logged error line).
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from gateway.codec.sse import encode_comment, encode_retry
from gateway.sim.evaluations import EvaluationRun
from gateway.sim.responses import error_response, new_request_id
from gateway.sim.state import SimState, is_missing

HEARTBEAT_COMMENT = encode_comment("keep-alive")


class _StreamHandle:
    """One open SSE response, as `/_sim/drop` and the claim registry see it."""

    def __init__(self, resource: str) -> None:
        self.resource = resource
        self.wake = asyncio.Event()
        self.drop_mode: str | None = None
        self.disconnected = False

    def holds(self, resource: str) -> bool:
        return resource == self.resource

    def drop(self, mode: str) -> None:
        self.drop_mode = mode
        self.wake.set()


class EvaluationStream:
    """`GET /api/v1/{kind}/{evaluation_id}/stream` for one kind (evaluations or trace-evaluations)."""

    def __init__(self, state: SimState, kind: str) -> None:
        self._state = state
        self._kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        evaluation_id: str = scope["path_params"]["evaluation_id"]
        if is_missing(evaluation_id):
            missing = error_response(404, "not_found", f"evaluation {evaluation_id} not found")
            await missing(scope, receive, send)
            return
        headers = Headers(scope=scope)
        api_key = headers.get("x-api-key", "")
        resource = f"{self._kind}/{evaluation_id}"
        state = self._state
        handle = _StreamHandle(resource)
        if not state.claim(resource, api_key, handle):
            response = error_response(409, "stream_already_open",
                                      f"a stream for {resource} is already open for this API key")
            await response(scope, receive, send)
            return
        stats = state.stats(resource)
        state.add_live(handle)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                state.remove_live(handle)
                state.release(resource, api_key, handle, stats)

        try:
            run = state.evaluation(self._kind, evaluation_id)
            cursor = run.timeline.resume_cursor(headers.get("last-event-id"))
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
                (b"x-request-id", new_request_id().encode()),
            ]})
            await send({"type": "http.response.body", "body": encode_retry(state.settings.retry_ms),
                        "more_body": True})
            watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, handle))
            try:
                await self._pump(send, run, handle, cursor, state.inactivity_timeout(resource))
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            # Release before the body ends, so a client that reconnects at once is not refused.
            release()
            if handle.drop_mode == "abort" or handle.disconnected:
                return  # uvicorn closes the socket mid-body
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away while we were writing
        finally:
            release()

    async def _pump(self, send: Send, run: EvaluationRun, handle: _StreamHandle, cursor: int,
                    inactivity_timeout: float) -> None:
        """Write events after `cursor` as they appear, until terminal, inactivity, drop or disconnect."""
        loop = asyncio.get_running_loop()
        heartbeat = self._state.settings.heartbeat
        last_event = last_write = loop.time()
        timeline = run.timeline
        timeline.add_waker(handle.wake)
        try:
            while True:
                handle.wake.clear()
                for event in timeline.after(cursor):
                    if handle.drop_mode is not None or handle.disconnected:
                        return
                    await send({"type": "http.response.body", "body": event.frame, "more_body": True})
                    cursor = event.id
                    last_event = last_write = loop.time()
                    if event.terminal:
                        return
                if handle.drop_mode is not None or handle.disconnected or timeline.finished:
                    return
                now = loop.time()
                if now - last_event >= inactivity_timeout:
                    return
                if now - last_write >= heartbeat:
                    await send({"type": "http.response.body", "body": HEARTBEAT_COMMENT, "more_body": True})
                    last_write = now
                deadline = min(last_event + inactivity_timeout, last_write + heartbeat)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await handle.wake.wait()
        finally:
            timeline.remove_waker(handle.wake)


async def _watch_disconnect(receive: Receive, handle: _StreamHandle) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            handle.disconnected = True
            handle.wake.set()
            return
