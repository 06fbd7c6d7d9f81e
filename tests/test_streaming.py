"""End to end: simulator → gateway → many real SSE clients, on loopback ports."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from tests.conftest import API_KEY, Gateway, Received, Sim, read_sse, terminal
from tests.servers import wait_for


def _expected_ids(n: int) -> list[str]:
    return [str(i) for i in range(1, n + 1)]


async def test_many_clients_identical_ordered_streams_one_upstream(sim: Sim, gateway: Gateway) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-many", "rows": 20, "interval": 0.01})
    url = f"{gateway.url}/api/v1/evaluations/e-many/stream"
    clients = [read_sse(url, gateway.headers(f"user-{i}"), until=terminal) for i in range(25)]
    results = await asyncio.gather(*clients)
    first = results[0]
    assert first.status == 200
    assert first.events[-1][1] == "final"
    # queued, running, 20 x (row_complete, progress), completed, final
    assert first.ids == _expected_ids(2 + 40 + 2)
    for other in results[1:]:
        assert other.events == first.events
    stats = await sim.resource("evaluations/e-many")
    assert stats["connects"] == 1
    assert stats["max_concurrent"] == 1


async def test_trace_evaluations_stream_too(sim: Sim, gateway: Gateway) -> None:
    got = await read_sse(f"{gateway.url}/api/v1/trace-evaluations/t-1/stream", gateway.headers(), until=terminal)
    assert got.status == 200 and got.events[-1][1] == "final"
    assert (await sim.resource("trace-evaluations/t-1"))["connects"] == 1


async def test_upstream_drop_mid_stream_no_gap_no_duplicate(sim: Sim, gateway: Gateway) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-drop", "rows": 30, "interval": 0.02})
    url = f"{gateway.url}/api/v1/evaluations/e-drop/stream"
    received = [Received() for _ in range(5)]
    tasks = [asyncio.create_task(read_sse(url, gateway.headers(f"u{i}"), until=terminal, received=r))
             for i, r in enumerate(received)]
    await wait_for(lambda: all(len(r.events) >= 10 for r in received), message="clients mid-stream")
    for mode in ("abort", "eof"):
        dropped = await sim.post("/_sim/drop", {"resource": "evaluations/e-drop", "mode": mode})
        assert dropped["dropped"] == 1
        target = len(received[0].events) + 5
        await wait_for(lambda t=target: all(len(r.events) >= t or terminal(r) for r in received),  # type: ignore[misc]
                       message="events after the drop")
    await asyncio.gather(*tasks)
    for r in received:
        assert r.ids == _expected_ids(2 + 60 + 2)
    stats = await sim.resource("evaluations/e-drop")
    assert stats["connects"] == 3
    assert stats["max_concurrent"] == 1


async def test_resume_from_the_middle_with_last_event_id(sim: Sim, gateway: Gateway) -> None:
    url = f"{gateway.url}/api/v1/evaluations/e-resume/stream"
    first = await read_sse(url, gateway.headers(), until=lambda r: len(r.events) >= 7)
    assert first.ids[-1] == "7"
    header = await read_sse(url, {**gateway.headers(), "Last-Event-ID": "7"}, until=terminal)
    assert header.ids[0] == "8"
    query = await read_sse(url + "?lastEventId=12", gateway.headers(), until=terminal)
    assert query.ids[0] == "13"
    full = first.ids + header.ids
    assert full == _expected_ids(len(full))
    assert header.ids[-1] == query.ids[-1]


async def test_late_joiner_gets_history_then_live(sim: Sim, gateway: Gateway) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-late", "rows": 20, "interval": 0.02})
    url = f"{gateway.url}/api/v1/evaluations/e-late/stream"
    early = Received()
    early_task = asyncio.create_task(read_sse(url, gateway.headers("early"), until=terminal, received=early))
    await wait_for(lambda: len(early.events) >= 15, message="early client progress")
    late = await read_sse(url, gateway.headers("late"), until=terminal)
    await early_task
    assert late.ids == early.ids == _expected_ids(44)
    assert (await sim.resource("evaluations/e-late"))["connects"] == 1


async def test_continuity_lost_when_position_was_trimmed(sim: Sim, gateway_factory: Any) -> None:
    gateway = await gateway_factory(limits={"replay_buffer": 5})
    url = f"{gateway.url}/api/v1/evaluations/e-trim/stream"
    first = await read_sse(url, gateway.headers(), until=terminal)
    assert first.events[-1][1] == "final"
    resumed = await read_sse(url, {**gateway.headers(), "Last-Event-ID": "2"}, until=terminal)
    assert resumed.events[0][1] == "gateway.continuity_lost"
    payload = json.loads(resumed.events[0][2])
    assert payload["code"] == "continuity_lost" and payload["reason"] == "trimmed"
    # Followed by the latest retained state, ending with the terminal event.
    assert resumed.events[-1][1] == "final"
    assert resumed.ids == first.ids[-len(resumed.ids):]


async def test_resume_after_gateway_restart(sim: Sim, gateway_factory: Any) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-restart", "rows": 15, "interval": 0.01})
    one = await gateway_factory()
    url = "/api/v1/evaluations/e-restart/stream"
    before = await read_sse(one.url + url, one.headers(), until=lambda r: len(r.events) >= 9)
    two = await gateway_factory()  # a fresh process would know nothing either
    after = await read_sse(two.url + url, {**two.headers(), "Last-Event-ID": before.ids[-1] or ""}, until=terminal)
    assert [e for e in after.events if e[1].startswith("gateway.")] == []
    assert before.ids + after.ids == _expected_ids(2 + 30 + 2)


async def test_resume_after_terminal_event_answers_204(sim: Sim, gateway: Gateway) -> None:
    url = f"{gateway.url}/api/v1/evaluations/e-done/stream"
    done = await read_sse(url, gateway.headers(), until=terminal)
    last = done.ids[-1] or ""
    async with httpx.AsyncClient() as client:
        response = await client.get(url, headers={**gateway.headers(), "Last-Event-ID": last})
    assert response.status_code == 204


async def test_upstream_error_event_passes_through(sim: Sim, gateway: Gateway) -> None:
    got = await read_sse(f"{gateway.url}/api/v1/evaluations/eval-fail-9/stream", gateway.headers(), until=terminal)
    assert got.events[-1][1] == "error"
    assert got.of_type("status")[-1] == {"status": "failed"}


async def test_upstream_404_ends_stream_with_close_event(sim: Sim, gateway: Gateway) -> None:
    got = await read_sse(f"{gateway.url}/api/v1/evaluations/missing-1/stream", gateway.headers(), until=terminal)
    assert got.events[-1][1] == "gateway.close"
    close = json.loads(got.events[-1][2])
    assert close["code"] == "upstream_failed" and close["reconnect"] is False
    assert "404" in close["detail"]
    assert API_KEY not in got.events[-1][2]


async def test_unauthenticated_requests_get_401_and_open_nothing(sim: Sim, gateway: Gateway) -> None:
    url = f"{gateway.url}/api/v1/evaluations/e-401/stream"
    async with httpx.AsyncClient() as client:
        cases = [
            {},
            {"Authorization": "Bearer not-a-jwt"},
            {"Authorization": "Basic abc"},
            {"Authorization": f"Bearer {gateway.token(ttl=-120)}"},
            {"Authorization": f"Bearer {gateway.token()[:-4]}AAAA"},
        ]
        for headers in cases:
            response = await client.get(url, headers=headers)
            assert response.status_code == 401, headers
            body = response.json()
            assert set(body["error"]) == {"code", "message"}
            assert len(body["error"]["message"]) < 80
    assert await sim.resource("evaluations/e-401") == {} or (await sim.resource("evaluations/e-401"))["connects"] == 0


async def test_stream_headers(sim: Sim, gateway: Gateway) -> None:
    async with httpx.AsyncClient() as client, client.stream(
        "GET", f"{gateway.url}/api/v1/evaluations/e-h/stream", headers=gateway.headers()
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-accel-buffering"] == "no"


async def test_heartbeats_flow_as_comments(sim: Sim, gateway: Gateway) -> None:
    await sim.post("/_sim/configure", {"resource": "evaluations/e-hb", "rows": 1, "interval": 3})
    chunks: list[bytes] = []
    async with httpx.AsyncClient() as client, client.stream(
        "GET", f"{gateway.url}/api/v1/evaluations/e-hb/stream", headers=gateway.headers()
    ) as response:
        async with asyncio.timeout(5):
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
                if b"".join(chunks).count(b":\n\n") >= 2:
                    break
    assert b"".join(chunks).count(b":\n\n") >= 2


async def test_api_key_never_reaches_clients(sim: Sim, gateway: Gateway) -> None:
    bodies: list[str] = []
    for path in ("evaluations/e-scan", "evaluations/eval-fail-2", "evaluations/missing-2"):
        got = await read_sse(f"{gateway.url}/api/v1/{path}/stream", gateway.headers(), until=terminal)
        bodies.extend(got.raw)
    async with httpx.AsyncClient() as client:
        for path in ("/api/v1/evaluations/e-scan", "/api/v1/evaluations/missing-3", "/healthz", "/metrics",
                     "/api/v1/evaluations/e-scan/stream"):
            response = await client.get(gateway.url + path, headers=gateway.headers())
            bodies.append(response.text)
            bodies.extend(f"{k}: {v}" for k, v in response.headers.items())
    assert bodies
    for body in bodies:
        assert API_KEY not in body


async def test_unknown_resume_id_on_a_fresh_stream_signals_continuity_lost(sim: Sim, gateway: Gateway) -> None:
    # A fresh gateway waits for the id while the upstream replays; it never comes, so the
    # client is told (mid-stream) and gets the whole history.
    url = f"{gateway.url}/api/v1/evaluations/e-unknown/stream"
    got = await read_sse(url, {**gateway.headers(), "Last-Event-ID": "not-an-id"}, until=terminal)
    names = [e[1] for e in got.events]
    assert names[0] == "gateway.continuity_lost" and names[-1] == "final"
    assert json.loads(got.events[0][2])["reason"] == "unknown"
    assert got.ids == _expected_ids(len(got.ids))
