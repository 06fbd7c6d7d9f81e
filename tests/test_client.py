"""gateway_client: pure pieces (backoff, frame decoding, no-duplicate cursor), then a real
gateway and simulator on loopback: whole streams, upstream drops, a gateway restart on the
same port, a network cut, and every way a stream can refuse or end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.auth.tokens import mint_token
from gateway_client import (
    AuthError,
    Backoff,
    ContinuityLost,
    Event,
    EventStream,
    GatewayClient,
    RetriesExhausted,
    StreamClosed,
)
from gateway_client.backoff import Attempts
from gateway_client.errors import GatewayResponseError, error_from_response
from gateway_client.events import CloseNotice, Cursor, decode
from tests.conftest import SECRET, Gateway, Sim, gateway_config
from tests.proxy import tcp_proxy
from tests.servers import reserved_socket, serve_gateway, wait_for

pytestmark = pytest.mark.timeout(20)

FAST = Backoff(base=0.05, cap=0.5, max_elapsed=15)
"""Client backoff for tests; the gateway's own `retry:` hint (1-5 s) still sets the floor."""


def ids(events: list[Event]) -> list[str | None]:
    return [e.id for e in events]


def contiguous(n: int) -> list[str | None]:
    return [str(i) for i in range(1, n + 1)]


@dataclass
class Watcher:
    """Consumes a stream in a task, so a test can act while it runs and look at what arrived."""

    stream: EventStream
    events: list[Event] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def start(self) -> Watcher:
        self.task = asyncio.create_task(self._consume())
        return self

    async def _consume(self) -> None:
        async with self.stream:
            async for event in self.stream:
                self.events.append(event)

    async def result(self, timeout: float = 15) -> list[Event]:
        assert self.task is not None
        async with asyncio.timeout(timeout):
            await self.task
        return self.events


class TokenSource:
    """A token callable that counts how often the client asked."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        return self.tokens[min(self.calls, len(self.tokens)) - 1]


# --- pure: backoff --------------------------------------------------------------------------


def test_backoff_window_grows_to_the_cap_and_respects_the_floor() -> None:
    top = Backoff(base=1, cap=8, rand=lambda: 0.999)
    assert [round(top.delay(n), 3) for n in range(6)] == [0.999, 1.998, 3.996, 7.992, 7.992, 7.992]
    bottom = Backoff(base=1, cap=8, rand=lambda: 0.0)
    assert bottom.delay(5) == 0.0
    assert bottom.delay(5, floor=2.5) == 2.5  # never sooner than a retry:/Retry-After hint
    assert Backoff(base=1, cap=8, rand=lambda: 0.5).delay(1, floor=0.2) == 1.0
    assert Backoff(base=0.5, cap=30, rand=lambda: 0.5).delay(10_000) == 15.0  # no overflow


def test_attempts_stop_at_max_attempts_or_max_elapsed_and_reset_on_progress() -> None:
    counted = Attempts(Backoff(base=1, cap=4, max_attempts=2, max_elapsed=None, rand=lambda: 1.0))
    assert [counted.next_delay(), counted.next_delay(), counted.next_delay()] == [1.0, 2.0, None]
    counted.progressed()
    assert counted.next_delay() == 1.0
    now = [100.0]
    timed = Attempts(Backoff(base=1, cap=4, max_elapsed=10, rand=lambda: 1.0), clock=lambda: now[0])
    assert timed.next_delay() == 1.0
    now[0] += 9.9
    assert timed.next_delay() == 2.0
    now[0] += 0.1
    assert timed.next_delay() is None
    with pytest.raises(ValueError, match="cap must be >= base"):
        Backoff(base=2, cap=1)


# --- pure: frames, cursor, errors ----------------------------------------------------------


def test_decode_maps_gateway_frames_to_typed_items() -> None:
    event = decode("row_complete", '{"row": {"score": 1.0}}', "3")
    assert event == Event("3", "row_complete", {"row": {"score": 1.0}})
    assert decode("status", "not json", "4") == Event("4", "status", "not json")
    assert decode("message", "", "") is None  # a retry-only frame
    close = decode("gateway.close", '{"code":"superseded","reconnect":false,"message":"m","lastEventId":"7"}', "7")
    assert close == CloseNotice("superseded", False, "m", "7")
    unknown = decode("gateway.close", '{"code":"brand_new","reconnect":true,"message":"x"}', "7")
    assert isinstance(unknown, CloseNotice) and unknown.reconnect is True
    assert decode("gateway.close", "garbage", "") == CloseNotice("unknown", False, "")
    lost = decode("gateway.continuity_lost", '{"code":"continuity_lost","reason":"trimmed","oldestRetainedId":"40"}',
                  "2")
    assert isinstance(lost, ContinuityLost)
    assert (lost.id, lost.type, lost.reason, lost.oldest_retained_id) == (
        None, "gateway.continuity_lost", "trimmed", "40")


def test_cursor_never_accepts_an_event_twice() -> None:
    cursor = Cursor("5")
    assert [cursor.accept(i) for i in ("4", "5", "6", "6", "10", "9")] == [False, False, True, False, True, False]
    assert cursor.last_event_id == "10"
    opaque = Cursor(window=2)
    assert [opaque.accept(i) for i in ("a", "b", "a", "c", "a")] == [True, True, False, True, True]
    cursor.restart()  # continuity lost: what follows is the new truth, even lower ids
    assert cursor.accept("3") and cursor.last_event_id == "3"


def test_error_from_response_keeps_the_gateway_code_and_retry_after() -> None:
    limited = error_from_response(429, {"retry-after": "3"}, b'{"error":{"code":"too_many_streams","message":"m"}}')
    assert (limited.status, limited.code, limited.retry_after, limited.retryable) == (429, "too_many_streams", 3, True)
    denied = error_from_response(403, {}, b'{"error":{"code":"forbidden","message":"no"}}')
    assert isinstance(denied, AuthError) and not denied.retryable and denied.message == "no"
    junk = error_from_response(404, {"retry-after": "soon"}, b"<html>")
    assert (junk.code, junk.message, junk.retry_after) == (None, "HTTP 404", None)


def test_the_client_does_not_import_the_server_package() -> None:
    code = "import sys, gateway_client; print(sorted(m for m in sys.modules if m.split('.')[0] == 'gateway'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=15, check=True)
    assert out.stdout.strip() == "[]"


# --- against a real gateway ------------------------------------------------------------------


async def test_whole_evaluation_streams_typed_events_to_its_terminal_event(sim: Sim, gateway: Gateway) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-whole", "rows": 5, "interval": 0.01})
    async with GatewayClient(gateway.url, token=gateway.token()) as client:
        stream = client.evaluations.stream("e-whole")
        events = [event async for event in stream]
        trace = [event.type async for event in client.trace_evaluations.stream("t-whole")]
    assert all(type(e) is Event for e in events)
    assert ids(events) == contiguous(2 + 10 + 2) and stream.last_event_id == "14" and stream.reconnects == 0
    assert events[0].type == "status" and events[0].data == {"status": "queued"}
    rows = [e.data["row"] for e in events if e.type == "row_complete"]
    assert [row["index"] for row in rows] == list(range(5)) and all("score" in row for row in rows)
    assert events[-1].type == "final" and "accuracy" in events[-1].data["result"]
    assert trace[-1] == "final"


async def test_upstream_drop_mid_stream_no_gap_no_duplicate(sim: Sim, gateway: Gateway) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-cdrop", "rows": 30, "interval": 0.02})
    async with GatewayClient(gateway.url, token=gateway.token(), backoff=FAST) as client:
        watcher = Watcher(client.evaluations.stream("e-cdrop")).start()
        await wait_for(lambda: len(watcher.events) >= 10, message="stream under way")
        for mode in ("abort", "eof"):
            assert (await sim.post("/_sim/drop", {"resource": "evaluations/e-cdrop", "mode": mode}))["dropped"] == 1
            target = len(watcher.events) + 5
            await wait_for(lambda t=target: len(watcher.events) >= t, message="events after the drop")  # type: ignore[misc]
        events = await watcher.result()
    assert ids(events) == contiguous(2 + 60 + 2) and events[-1].type == "final"
    assert watcher.stream.reconnects == 0  # the gateway absorbed the drops
    assert (await sim.resource("evaluations/e-cdrop"))["connects"] == 3


def _listening_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextlib.asynccontextmanager
async def _gateway_on(sock: socket.socket, sim_url: str) -> AsyncIterator[Gateway]:
    config = gateway_config(sim_url)
    app = create_app(config, registry=CollectorRegistry())
    async with serve_gateway(app, config, sock) as url:
        yield Gateway(url, app, config)


@pytest.mark.parametrize("shutdown", ["drain", "abrupt"])
async def test_gateway_restart_mid_stream_resumes_with_no_gap_and_no_duplicate(
        sim: Sim, shutdown: str, caplog: pytest.LogCaptureFixture) -> None:
    """Stop the gateway mid-stream (draining: `shutting_down`; or not: a cut body) and start a new one on its port."""
    resource = f"evaluations/e-restart-{shutdown}"
    await sim.post("/_sim/configure", {"resource": resource, "rows": 60, "interval": 0.04})
    caplog.set_level(logging.INFO, logger="gateway_client")
    first_sock = _listening_socket()
    port = first_sock.getsockname()[1]
    tokens = TokenSource(mint_token(SECRET, "HS256", "alice", 300, {"streams": ["*/*"]}))
    async with GatewayClient(f"http://127.0.0.1:{port}", token=tokens, backoff=FAST) as client:
        async with _gateway_on(first_sock, sim.url) as one:
            watcher = Watcher(client.evaluations.stream(resource.partition("/")[2])).start()
            await wait_for(lambda: len(watcher.events) >= 10, message="stream under way")
            if shutdown == "drain":
                assert one.app.begin_drain() == 1
        stopped_at = len(watcher.events)  # gateway one is gone, and so is its port until two binds it
        async with _gateway_on(_listening_socket(port), sim.url):
            events = await watcher.result()
    assert stopped_at < 2 + 120 + 2
    assert ids(events) == contiguous(2 + 120 + 2) and events[-1].type == "final"
    assert watcher.stream.reconnects >= 1 and tokens.calls >= 2  # a token asked for on every connect
    interruptions = [r.getMessage() for r in caplog.records if r.name == "gateway_client"]
    assert ("shutting_down" in interruptions[0]) == (shutdown == "drain"), interruptions


async def test_network_cut_without_close_reconnects_and_resumes(sim: Sim, gateway: Gateway) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-cut", "rows": 40, "interval": 0.03})
    async with tcp_proxy(gateway.url) as (proxy, proxy_url), \
            GatewayClient(proxy_url, token=gateway.token(), backoff=FAST) as client:
        watcher = Watcher(client.evaluations.stream("e-cut")).start()
        await wait_for(lambda: len(watcher.events) >= 10, message="stream under way")
        assert proxy.cut() >= 1
        events = await watcher.result()
    assert ids(events) == contiguous(2 + 80 + 2) and events[-1].type == "final"
    assert watcher.stream.reconnects >= 1


async def test_token_expired_close_reconnects_with_a_fresh_token(sim: Sim, gateway: Gateway) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-exp", "rows": 40, "interval": 0.05})
    tokens = TokenSource(gateway.token(ttl=2), gateway.token())
    async with GatewayClient(gateway.url, token=tokens, backoff=FAST) as client:
        stream = client.evaluations.stream("e-exp")
        events = [event async for event in stream]
    assert ids(events) == contiguous(2 + 80 + 2) and events[-1].type == "final"
    assert stream.reconnects >= 1 and tokens.calls >= 2


async def test_superseded_raises_stream_closed_with_the_resume_point(sim: Sim, gateway: Gateway) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-sup", "rows": 50, "interval": 0.05})
    async with GatewayClient(gateway.url, token=gateway.token("alice"), backoff=FAST) as client:
        watcher = Watcher(client.evaluations.stream("e-sup")).start()
        await wait_for(lambda: len(watcher.events) >= 3, message="first stream under way")
        async with client.evaluations.stream("e-sup") as elsewhere:  # the same user, another tab
            assert (await anext(elsewhere)).id == "1"
            with pytest.raises(StreamClosed) as closed:
                await watcher.result()
    assert closed.value.code == "superseded" and closed.value.reconnect is False
    assert closed.value.last_event_id == watcher.events[-1].id == watcher.stream.last_event_id
    assert watcher.stream.reconnects == 0


async def test_inactivity_timeout_raises_with_poll_and_get_polls(sim: Sim, gateway_factory: Any) -> None:
    gateway = await gateway_factory(limits={"inactivity_timeout": 1})
    await sim.post("/_sim/configure", {"resource": "evaluations/e-idle", "rows": 3, "interval": 60})
    async with GatewayClient(gateway.url, token=gateway.token(), backoff=FAST) as client:
        stream = client.evaluations.stream("e-idle")
        with pytest.raises(StreamClosed) as closed:
            async for _ in stream:
                pass
        polled = await client.evaluations.get("e-idle")
    assert closed.value.code == "inactivity_timeout" and closed.value.poll == "/api/v1/evaluations/e-idle"
    assert closed.value.last_event_id == stream.last_event_id is not None
    assert polled["id"] == "e-idle" and "status" in polled


async def test_auth_failures_raise_auth_error_and_a_token_callable_gets_one_retry(sim: Sim, gateway: Gateway) -> None:
    async with GatewayClient(gateway.url, token="not-a-jwt") as client:
        with pytest.raises(AuthError) as static:
            await anext(client.evaluations.stream("e-401"))
    assert static.value.status == 401
    always_bad = TokenSource("bad", "still-bad")
    async with GatewayClient(gateway.url, token=always_bad) as client:
        with pytest.raises(AuthError):
            await anext(client.evaluations.stream("e-401"))
    assert always_bad.calls == 2
    stale_then_fresh = TokenSource(gateway.token(ttl=-120), gateway.token())
    async with GatewayClient(gateway.url, token=stale_then_fresh) as client:
        events = [event async for event in client.evaluations.stream("e-401")]
    assert events[-1].type == "final" and stale_then_fresh.calls == 2
    jobs_only = gateway.token(streams=["optimizations/*"])
    async with GatewayClient(gateway.url, token=jobs_only) as client:
        with pytest.raises(AuthError) as forbidden:
            await anext(client.evaluations.stream("e-403"))
        with pytest.raises(AuthError):
            await client.evaluations.get("e-403")
    assert forbidden.value.status == 403


async def test_optimization_job_stream_yields_the_upstream_event_objects(sim: Sim, gateway: Gateway) -> None:
    await sim.post("/_sim/configure", {"resource": "optimizations/j-client", "iterations": 2, "interval": 0.01})
    async with GatewayClient(gateway.url, token=gateway.token()) as client:
        events = [event async for event in client.optimizations.stream("j-client")]
    assert ids(events) == contiguous(len(events))
    assert events[0].type == "job_started" and events[-1].type == "job_complete"
    for event in events:
        assert event.data["eventType"] == event.type and str(event.data["id"]) == event.id
        assert {"iteration", "timestamp", "data"} <= set(event.data)


async def test_resume_after_the_terminal_event_ends_at_once(sim: Sim, gateway: Gateway) -> None:
    async with GatewayClient(gateway.url, token=gateway.token()) as client:
        done = [event async for event in client.evaluations.stream("e-204")]
        again = client.evaluations.stream("e-204", after_event_id=done[-1].id)
        assert [event async for event in again] == []
        middle = [event async for event in client.evaluations.stream("e-204", after_event_id=5)]
    assert ids(middle) == ids(done)[5:]


async def test_continuity_lost_is_yielded_before_the_retained_history(sim: Sim, gateway_factory: Any) -> None:
    gateway = await gateway_factory(limits={"replay_buffer": 5})
    async with GatewayClient(gateway.url, token=gateway.token()) as client:
        done = [event async for event in client.evaluations.stream("e-trim-c")]
        resumed = [event async for event in client.evaluations.stream("e-trim-c", after_event_id="2")]
    lost = resumed[0]
    assert isinstance(lost, ContinuityLost) and lost.reason == "trimmed"
    assert lost.oldest_retained_id == resumed[1].id
    assert resumed[1:] == done[-len(resumed[1:]):] and resumed[-1].type == "final"


async def test_refused_connections_back_off_then_give_up() -> None:
    draws: list[float] = []

    def rand() -> float:
        draws.append(0.5)
        return 0.5

    policy = Backoff(base=0.01, cap=0.04, max_attempts=3, rand=rand)
    with reserved_socket() as refusing:  # bound, never listening: every connection is refused
        url = f"http://127.0.0.1:{refusing.getsockname()[1]}"
        async with GatewayClient(url, token="t", backoff=policy) as client:
            stream = client.evaluations.stream("e-nowhere")
            with pytest.raises(RetriesExhausted) as exhausted:
                await anext(stream)
    assert exhausted.value.attempts == 3 and stream.reconnects == 3 and len(draws) == 3
    assert isinstance(exhausted.value.__cause__, httpx.ConnectError)


async def test_per_user_cap_is_a_retryable_refusal(sim: Sim, gateway_factory: Any) -> None:
    gateway = await gateway_factory(server={"max_connections_per_consumer": 1})
    await sim.post("/_sim/configure", {"resource": "evaluations/e-cap", "rows": 200, "interval": 0.05})
    async with GatewayClient(gateway.url, token=gateway.token("bob")) as client, \
            GatewayClient(gateway.url, token=gateway.token("bob"), backoff=Backoff(max_attempts=0)) as other, \
            client.evaluations.stream("e-cap") as holder:
        assert (await anext(holder)).id == "1"
        with pytest.raises(RetriesExhausted) as exhausted:
            await anext(other.evaluations.stream("e-other"))
    cause = exhausted.value.__cause__
    assert isinstance(cause, GatewayResponseError) and cause.status == 429 and cause.retryable
    assert cause.retry_after == 10  # what the gateway asks; a retry would wait at least this long


async def test_retry_hint_and_retry_after_set_the_floor_and_replays_are_dropped() -> None:
    """Scripted answers: a body cut after `retry: 200`, a 503 with Retry-After, then a replay of event 1."""
    answers = [
        httpx.Response(200, headers={"content-type": "text/event-stream"},
                       content=b"retry: 200\n\nid: 1\nevent: status\ndata: {\"status\": \"queued\"}\n\n"),
        httpx.Response(503, headers={"retry-after": "0.3"}, json={"error": {"code": "over_capacity", "message": "m"}}),
        httpx.Response(200, headers={"content-type": "text/event-stream"},
                       content=b"id: 1\nevent: status\ndata: {\"status\": \"queued\"}\n\n"
                               b"id: 2\nevent: final\ndata: {\"result\": {}}\n\n"),
    ]
    seen: list[tuple[float, httpx.Request]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append((time.monotonic(), request))
        return answers[len(seen) - 1]

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    no_jitter = Backoff(base=0.01, cap=0.01, rand=lambda: 0.0)
    async with http, GatewayClient("http://gw.test", token="t", http_client=http, backoff=no_jitter) as client:
        stream = client.evaluations.stream("e-503")
        events = [event async for event in stream]
    assert events == [Event("1", "status", {"status": "queued"}), Event("2", "final", {"result": {}})]
    (t0, first), (t1, second), (t2, third) = seen
    assert t1 - t0 >= 0.2 and t2 - t1 >= 0.3 and stream.reconnects == 2
    assert first.headers["authorization"] == "Bearer t" and first.url.path == "/api/v1/evaluations/e-503/stream"
    assert "last-event-id" not in first.headers
    assert second.headers["last-event-id"] == third.headers["last-event-id"] == "1"
