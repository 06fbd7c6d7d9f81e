"""The Stratix simulator, over real sockets: uvicorn on port 0, httpx/httpx-sse and websockets clients."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import replace
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.sim import SimSettings, add_sim_arguments, create_sim_app, settings_from_args
from gateway.sim.evaluations import plan_evaluation
from gateway.sim.settings import ResourceOverrides
from gateway.sim.timeline import Timeline
from tests.servers import serve, wait_for

KEY = "test-key"
AUTH = {"X-API-Key": KEY}
FAST = SimSettings(api_key=KEY, rows=4, interval=0.01, iterations=3, job_interval=0.01, heartbeat=5.0)

Sim = Callable[..., AbstractAsyncContextManager["SimClient"]]


class SimClient:
    """A running simulator and an httpx client pointed at it."""

    def __init__(self, base: str, http: httpx.AsyncClient) -> None:
        self.base = base
        self.http = http
        self.ws_url = base.replace("http://", "ws://") + "/ws/optimization"

    async def stats(self) -> dict[str, Any]:
        response = await self.http.get("/_sim/stats")
        assert response.status_code == 200
        body: dict[str, Any] = response.json()
        return body

    async def resource_stats(self, resource: str) -> dict[str, int]:
        stats: dict[str, int] = (await self.stats()).get(resource, {})
        return stats

    async def configure(self, resource: str, **overrides: Any) -> None:
        response = await self.http.post("/_sim/configure", json={"resource": resource, **overrides})
        assert response.status_code == 200, response.text

    async def events(self, path: str, headers: dict[str, str] | None = None) -> list[Any]:
        """Every event of one SSE response until the server ends it (retry-only frames skipped)."""
        events = []
        async with aconnect_sse(self.http, "GET", path, headers={**AUTH, **(headers or {})}) as source:
            assert source.response.status_code == 200
            async for sse in source.aiter_sse():
                if sse.data:
                    events.append(sse)
        return events

    def ws(self, key: str = KEY) -> AbstractAsyncContextManager[ClientConnection]:
        return connect(self.ws_url, additional_headers={"X-API-Key": key}, open_timeout=5)


@pytest.fixture
def sim() -> Sim:
    @asynccontextmanager
    async def start(**changes: Any) -> AsyncIterator[SimClient]:
        settings = replace(FAST, **changes)
        async with serve(create_sim_app(settings)) as base, \
                httpx.AsyncClient(base_url=base, timeout=10) as http:
            yield SimClient(base, http)
    return start


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    """The next message, or a failure after 5 s rather than a hung test."""
    async with asyncio.timeout(5):
        message: dict[str, Any] = json.loads(await ws.recv())
    return message


async def job_events_until_terminal(ws: ClientConnection, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        message = await recv_json(ws)
        if message["type"] == "event" and message["jobId"] == job_id:
            events.append(message["event"])
            if message["event"]["eventType"] in ("job_complete", "job_failed", "job_cancelled"):
                return events


# -- pure parts ------------------------------------------------------------------------------------


def test_plans_are_deterministic_per_id() -> None:
    assert plan_evaluation("evaluations/e1", 5, False) == plan_evaluation("evaluations/e1", 5, False)
    assert plan_evaluation("evaluations/e1", 5, False) != plan_evaluation("trace-evaluations/e1", 5, False)
    assert plan_evaluation("evaluations/e1", 6, True).fail_after == 3


def test_timeline_resume_cursor_treats_unknown_ids_as_start() -> None:
    timeline: Timeline[int] = Timeline()
    for item in range(3):
        timeline.append(item)
    assert timeline.resume_cursor("2") == 2
    assert timeline.resume_cursor(3) == 3
    for unknown in (None, "", "abc", "-1", "4", "1.5", True, 99):
        assert timeline.resume_cursor(unknown) == 0
    assert list(timeline.after(2)) == [2]


def test_settings_validation_reports_every_problem() -> None:
    with pytest.raises(ValueError, match=r"rows.*interval.*heartbeat"):
        SimSettings(rows=-1, interval=-1, heartbeat=0)
    with pytest.raises(ValueError, match=r"unknown field 'colour'.*rows must be int"):
        ResourceOverrides.parse({"resource": "evaluations/e", "colour": 1, "rows": "x"})
    parsed = ResourceOverrides.parse({"interval": 1, "fail": True})
    assert parsed == ResourceOverrides(interval=1.0, fail=True)


def test_cli_arguments_build_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATIX_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    ns = parser.parse_args(["--rows", "3", "--interval", "0.1", "--inactivity-timeout", "9",
                            "--jobs", "a,b", "--iterations", "2", "--port", "0"])
    settings = settings_from_args(ns)
    assert (ns.host, ns.port) == ("127.0.0.1", 0)
    assert settings == SimSettings(api_key="from-env", rows=3, interval=0.1, inactivity_timeout=9.0,
                                   iterations=2, job_ids=("a", "b"))
    monkeypatch.delenv("STRATIX_API_KEY")
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    assert settings_from_args(parser.parse_args([])) == SimSettings()


# -- authentication and errors ---------------------------------------------------------------------


async def test_api_key_is_required_everywhere(sim: Sim) -> None:
    async with sim() as s:
        for headers in ({}, {"X-API-Key": "wrong"}):
            for path in ("/api/v1/evaluations/e1", "/api/v1/evaluations/e1/stream", "/api/v1/optimizations"):
                response = await s.http.get(path, headers=headers)
                assert response.status_code == 401
                assert response.json()["error"]["code"] == "unauthorized"
                assert response.headers["x-request-id"]
        with pytest.raises(InvalidStatus) as refused:
            async with s.ws(key="wrong"):
                pass
        assert refused.value.response.status_code == 401
        # Header names are case-insensitive; nothing was started by the refused requests.
        assert (await s.http.get("/api/v1/evaluations/e1", headers={"x-api-key": KEY})).status_code == 200
        assert "evaluations/e1" in await s.stats()
        assert (await s.stats())["evaluations/e1"]["connects"] == 0


async def test_missing_ids_are_404_with_error_envelope(sim: Sim) -> None:
    async with sim() as s:
        for path in ("/api/v1/evaluations/missing-1", "/api/v1/trace-evaluations/missing-1/stream",
                     "/api/v1/optimizations/missing-job", "/api/v1/nothing-here"):
            response = await s.http.get(path, headers=AUTH)
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == "not_found"
            assert response.headers["x-request-id"]


# -- evaluation streams ----------------------------------------------------------------------------


async def test_full_lifecycle_has_ids_from_one_and_ends_after_final(sim: Sim) -> None:
    async with sim() as s:
        async with s.http.stream("GET", "/api/v1/evaluations/e1/stream", headers=AUTH) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            first_line = await response.aiter_lines().__anext__()
        assert first_line == "retry: 3000"
        await wait_for(lambda: _open_is_zero(s, "evaluations/e1"), timeout=5, message="stream released")

        events = await s.events("/api/v1/evaluations/e2/stream")
    names = [e.event for e in events]
    assert names == ["status", "status"] + ["row_complete", "progress"] * 4 + ["status", "final"]
    assert [e.id for e in events] == [str(i) for i in range(1, len(events) + 1)]
    payloads = [e.json() for e in events]
    assert [p["status"] for p in payloads if "status" in p] == ["queued", "running", "completed"]
    assert payloads[-3] == {"rows_complete": 4, "rows_total": 4}
    rows = [p["row"] for p in payloads if "row" in p]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) == {"index", "subset", "prompt", "result", "truth", "duration", "score", "metrics"}
    assert rows == list(plan_evaluation("evaluations/e2", 4, False).rows)
    result = payloads[-1]["result"]
    assert result["id"] == "e2" and result["status"] == "success"
    assert result["accuracy"] == sum(r["score"] for r in rows) / 4
    assert result["finished_at"] >= result["submitted_at"] > 0


async def _open_is_zero(s: SimClient, resource: str) -> bool:
    return (await s.resource_stats(resource)).get("open") == 0


async def test_last_event_id_resumes_and_unknown_ids_replay_everything(sim: Sim) -> None:
    async with sim(rows=3) as s:
        path = "/api/v1/evaluations/resume-1/stream"
        seen = []
        async with aconnect_sse(s.http, "GET", path, headers=AUTH) as source:
            async for sse in source.aiter_sse():
                if sse.data:
                    seen.append(sse)
                if sse.id == "4":
                    break
        await wait_for(lambda: _open_is_zero(s, "evaluations/resume-1"), timeout=5, message="stream released")
        rest = await s.events(path, headers={"Last-Event-ID": "4"})
        assert rest[0].id == "5"
        full = [e.id for e in seen] + [e.id for e in rest]
        assert full == [str(i) for i in range(1, 11)]
        assert rest[-1].event == "final"
        for unknown in ("nonsense", "999"):
            replay = await s.events(path, headers={"Last-Event-ID": unknown})
            assert [e.id for e in replay] == full
        assert await s.events(path, headers={"Last-Event-ID": "10"}) == []  # nothing after the terminal event
        assert (await s.resource_stats("evaluations/resume-1"))["connects"] == 5


async def test_second_concurrent_stream_is_refused_with_409(sim: Sim) -> None:
    async with sim(rows=50, interval=0.05) as s:
        path = "/api/v1/evaluations/dup-1/stream"
        async with aconnect_sse(s.http, "GET", path, headers=AUTH) as first:
            events = first.aiter_sse()
            assert (await events.__anext__()).retry == 3000
            second = await s.http.get(path, headers=AUTH)
            assert second.status_code == 409
            assert second.json()["error"]["code"] == "stream_already_open"
            # Trace evaluations are a separate namespace.
            async with s.http.stream("GET", "/api/v1/trace-evaluations/dup-1/stream", headers=AUTH) as trace:
                assert trace.status_code == 200
            await events.aclose()
        stats = await s.resource_stats("evaluations/dup-1")
        assert stats["rejected"] == 1 and stats["max_concurrent"] == 1
        await wait_for(lambda: _open_is_zero(s, "evaluations/dup-1"), timeout=5, message="stream released")
        async with s.http.stream("GET", path, headers=AUTH) as again:
            assert again.status_code == 200


async def test_idle_stream_closes_after_inactivity_even_while_heartbeats_flow(sim: Sim) -> None:
    async with sim(heartbeat=0.05) as s:
        await s.configure("evaluations/idle-1", interval=60, inactivity_timeout=0.4)
        lines: list[str] = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with s.http.stream("GET", "/api/v1/evaluations/idle-1/stream", headers=AUTH) as response:
            async for line in response.aiter_lines():
                lines.append(line)
        elapsed = loop.time() - started
    heartbeats = [line for line in lines if line.startswith(":")]
    assert len(heartbeats) >= 3
    assert [line for line in lines if line.startswith("event:")] == ["event: status"]  # only "queued"
    assert 0.35 <= elapsed < 5


async def test_failing_evaluation_emits_failed_then_error_and_closes(sim: Sim) -> None:
    async with sim(rows=6) as s:
        events = await s.events("/api/v1/evaluations/eval-fail-1/stream")
        names = [e.event for e in events]
        assert names == ["status", "status"] + ["row_complete", "progress"] * 3 + ["status", "error"]
        assert events[-2].json() == {"status": "failed"}
        error = events[-1].json()["error"]
        assert error["code"] and error["message"]
        polled = (await s.http.get("/api/v1/evaluations/eval-fail-1", headers=AUTH)).json()
        assert polled["status"] == "failure" and polled["failed_prompt_count"] == 3
        # An override can make a "fail" id succeed, and any id fail.
        await s.configure("trace-evaluations/ok", fail=True)
        trace = await s.events("/api/v1/trace-evaluations/ok/stream")
        assert trace[-1].event == "error"


async def test_polling_reflects_progress_and_counts_polls(sim: Sim) -> None:
    async with sim(interval=0.02, rows=10) as s:
        statuses: set[str] = set()

        async def finished() -> bool:
            body = (await s.http.get("/api/v1/trace-evaluations/poll-1", headers=AUTH)).json()
            statuses.add(body["status"])
            return bool(body["status"] == "success")

        await wait_for(finished, timeout=5, message="evaluation success")
        body = (await s.http.get("/api/v1/trace-evaluations/poll-1", headers=AUTH)).json()
        for field in ("id", "submitted_at", "finished_at", "model_id", "dataset_id", "average_duration",
                      "accuracy", "status_description", "model_name", "dataset_name", "failed_prompt_count"):
            assert field in body
        assert body["finished_at"] >= body["submitted_at"] and body["average_duration"] > 0
        assert statuses >= {"in-progress", "success"}
        stats = await s.stats()
        polls = stats["trace-evaluations/poll-1"]["polls"]
        assert polls >= 2 and stats["requests"]["trace-evaluations/poll-1"] == {"polls": polls}
        listing = (await s.http.get("/api/v1/evaluations", headers=AUTH)).json()
        assert listing == [{"id": i, "status": "pending"} for i in FAST.evaluation_ids]
        jobs = (await s.http.get("/api/v1/optimizations", headers=AUTH)).json()
        assert [j["id"] for j in jobs] == list(FAST.job_ids)


# -- control plane ---------------------------------------------------------------------------------


async def test_drop_cuts_a_live_stream_and_stats_count_connects(sim: Sim) -> None:
    async with sim(rows=100, interval=0.05) as s:
        path = "/api/v1/evaluations/drop-1/stream"
        for mode in ("abort", "eof"):
            received: list[str] = []
            with pytest.raises(httpx.RemoteProtocolError) if mode == "abort" else nullcontext():
                async with aconnect_sse(s.http, "GET", path, headers=AUTH) as source:
                    async for sse in source.aiter_sse():
                        received.append(sse.event)
                        if sse.id == "3" and len(received) < 10:
                            dropped = await s.http.post("/_sim/drop", json={"resource": "evaluations/drop-1",
                                                                             "mode": mode})
                            assert dropped.json() == {"dropped": 1}
            assert "final" not in received and len(received) < 50, mode
            await wait_for(lambda: _open_is_zero(s, "evaluations/drop-1"), timeout=5, message="released")
        stats = await s.resource_stats("evaluations/drop-1")
        assert stats["connects"] == 2 and stats["open"] == 0 and stats["rejected"] == 0
        assert (await s.http.post("/_sim/drop", json={})).json() == {"dropped": 0}
        assert (await s.http.post("/_sim/drop", json={"mode": "bogus"})).status_code == 400


async def test_configure_only_before_first_touch_and_reset_clears(sim: Sim) -> None:
    async with sim() as s:
        await s.configure("evaluations/cfg-1", rows=1)
        events = await s.events("/api/v1/evaluations/cfg-1/stream")
        assert [e.event for e in events].count("row_complete") == 1
        late = await s.http.post("/_sim/configure", json={"resource": "evaluations/cfg-1", "rows": 2})
        assert late.status_code == 409 and late.json()["error"]["code"] == "already_started"
        bad = await s.http.post("/_sim/configure", json={"resource": "nope/x", "rows": 2})
        assert bad.status_code == 400
        assert (await s.http.post("/_sim/reset")).json() == {"reset": True}
        stats = await s.stats()
        assert stats == {"ws_connections": {"connects": 0, "open": 0, "max_concurrent": 0}, "requests": {}}
        events = await s.events("/api/v1/evaluations/cfg-1/stream")
        assert [e.event for e in events].count("row_complete") == 4


# -- optimization WebSocket ------------------------------------------------------------------------


async def test_ws_subscribe_streams_a_whole_job(sim: Sim) -> None:
    async with sim(iterations=3) as s, s.ws() as ws:
        await ws.send(json.dumps({"type": "subscribe", "jobId": "job-demo-1"}))
        assert await recv_json(ws) == {"type": "subscribed", "jobId": "job-demo-1"}
        events = await job_events_until_terminal(ws, "job-demo-1")
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}  # nothing else arrived after the terminal event
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    types = [e["eventType"] for e in events]
    assert types[0] == "job_started" and types[-1] == "job_complete"
    assert types.count("iteration_start") == 3 and types.count("iteration_complete") == 3
    for name in ("mutation_generated", "evaluation_start", "evaluation_complete"):
        assert types.count(name) == 3
    by_type = {e["eventType"]: e for e in events}
    assert by_type["job_started"]["data"]["jobId"] == "job-demo-1"
    assert by_type["job_started"]["iteration"] is None
    assert {"preview", "mutationType"} <= set(by_type["mutation_generated"]["data"])
    assert {"score", "metrics"} <= set(by_type["evaluation_complete"]["data"])
    assert {"iteration", "bestScore"} <= set(by_type["iteration_complete"]["data"])
    assert "results" in by_type["job_complete"]["data"]
    if "new_best" in by_type:
        assert {"score", "improvement", "prompt"} <= set(by_type["new_best"]["data"])
    assert all(e["timestamp"].endswith("Z") for e in events)


async def test_ws_after_event_id_replays_and_duplicates_are_refused(sim: Sim) -> None:
    async with sim(iterations=2, job_interval=0.02) as s, s.ws() as first, s.ws() as second:
        await first.send(json.dumps({"type": "subscribe", "jobId": "j1"}))
        assert (await recv_json(first))["type"] == "subscribed"
        await recv_json(first)
        head = [(await recv_json(first))["event"] for _ in range(3)]
        assert [e["id"] for e in head] == [2, 3, 4]

        await second.send(json.dumps({"type": "subscribe", "jobId": "j1"}))
        refused = await recv_json(second)
        assert refused["type"] == "error" and refused["jobId"] == "j1"
        assert refused["error"]["code"] == "stream_already_open"
        await first.send(json.dumps({"type": "subscribe", "jobId": "j1"}))  # same connection: also refused

        await first.send(json.dumps({"type": "unsubscribe", "jobId": "j1"}))
        replies: list[dict[str, Any]] = []
        while not replies or replies[-1]["type"] != "unsubscribed":
            message = await recv_json(first)
            if message["type"] != "event":
                replies.append(message)
        assert [r["type"] for r in replies] == ["error", "unsubscribed"]
        assert replies[0]["error"]["code"] == "stream_already_open"

        await second.send(json.dumps({"type": "subscribe", "jobId": "j1", "afterEventId": 4}))
        assert (await recv_json(second))["type"] == "subscribed"
        rest = await job_events_until_terminal(second, "j1")
        assert rest[0]["id"] == 5 and rest[-1]["eventType"] == "job_complete"
        assert [e["id"] for e in rest] == list(range(5, 5 + len(rest)))

        stats = await s.resource_stats("optimizations/j1")
        assert stats["connects"] == 2 and stats["rejected"] == 2
        assert (await s.stats())["ws_connections"]["open"] == 2


async def test_ws_malformed_messages_get_error_frames(sim: Sim) -> None:
    async with sim() as s, s.ws() as ws:
        cases = [("{not json", "invalid_json"), ("[1, 2]", "invalid_message"),
                 (json.dumps({"type": "subscribe"}), "invalid_message"),
                 (json.dumps({"type": "dance"}), "unknown_type"),
                 (json.dumps({"type": "subscribe", "jobId": "missing-job"}), "not_found"),
                 (json.dumps({"type": "subscribe", "jobId": "j", "afterEventId": [1]}), "invalid_message")]
        for text, code in cases:
            await ws.send(text)
            reply = await recv_json(ws)
            assert reply["type"] == "error" and reply["error"]["code"] == code, text
        await ws.send(json.dumps({"type": "ping"}))
        assert await recv_json(ws) == {"type": "pong"}


@pytest.mark.parametrize(("job_id", "terminal", "reason_key"), [
    ("job-fail-1", "job_failed", "error"),
    ("job-cancel-1", "job_cancelled", "reason"),
])
async def test_ws_jobs_named_fail_or_cancel_end_midway(sim: Sim, job_id: str, terminal: str,
                                                       reason_key: str) -> None:
    async with sim(iterations=4) as s, s.ws() as ws:
        await ws.send(json.dumps({"type": "subscribe", "jobId": job_id}))
        assert (await recv_json(ws))["type"] == "subscribed"
        events = await job_events_until_terminal(ws, job_id)
    assert events[-1]["eventType"] == terminal and reason_key in events[-1]["data"]
    assert 1 <= [e["eventType"] for e in events].count("iteration_start") <= 2


async def test_ws_pausing_job_pauses_and_resumes_itself(sim: Sim) -> None:
    async with sim(iterations=3) as s, s.ws() as ws:
        await ws.send(json.dumps({"type": "subscribe", "jobId": "job-pause-1"}))
        await recv_json(ws)
        events = await job_events_until_terminal(ws, "job-pause-1")
    types = [e["eventType"] for e in events]
    paused = types.index("job_paused")
    assert types[paused - 1] == "iteration_complete" and events[paused]["data"]["iteration"] == 2
    assert types[paused + 1] == "job_resumed" and types[-1] == "job_complete"


async def test_operator_can_pause_resume_and_cancel_a_job(sim: Sim) -> None:
    async with sim(iterations=50, job_interval=0.02) as s, s.ws() as ws:
        await ws.send(json.dumps({"type": "subscribe", "jobId": "steer-1"}))
        await recv_json(ws)

        async def next_event() -> dict[str, Any]:
            while True:
                message = await recv_json(ws)
                if message["type"] == "event":
                    event: dict[str, Any] = message["event"]
                    return event

        await next_event()
        assert (await s.http.post("/_sim/jobs/steer-1/pause")).json()["command"] == "pause"
        while (event := await next_event())["eventType"] != "job_paused":
            pass
        assert event["data"]["reason"]
        polled = (await s.http.get("/api/v1/optimizations/steer-1", headers=AUTH)).json()
        assert polled["status"] == "paused"
        await s.http.post("/_sim/jobs/steer-1/resume")
        assert (await next_event())["eventType"] == "job_resumed"
        await s.http.post("/_sim/jobs/steer-1/cancel")
        while (event := await next_event())["eventType"] != "job_cancelled":
            pass
        assert (await s.http.post("/_sim/jobs/steer-1/pause")).status_code == 409
        assert (await s.http.post("/_sim/jobs/steer-1/explode")).status_code == 404


async def test_drop_closes_websockets_with_1011(sim: Sim) -> None:
    async with sim(iterations=100, job_interval=0.05) as s, s.ws() as ws:
        await ws.send(json.dumps({"type": "subscribe", "jobId": "jd"}))
        await recv_json(ws)
        await recv_json(ws)
        dropped = await s.http.post("/_sim/drop", json={"resource": "optimizations/jd"})
        assert dropped.json() == {"dropped": 1}
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await recv_json(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        await wait_for(lambda: _open_is_zero(s, "optimizations/jd"), timeout=5, message="released")
        assert (await s.stats())["ws_connections"] == {"connects": 1, "open": 0, "max_concurrent": 1}
