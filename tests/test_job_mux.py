"""The optimization job mux's message handling (pure: no socket, topics in memory).

What the upstream's job WebSocket says is applied to the attached topics: events published
once each, replays dropped, subscriptions confirmed or refused, junk ignored. The socket
loop itself runs against the simulator in test_optimizations.py.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.codec.closes import UPSTREAM_FAILED
from gateway.codec.events import strict_json_loads
from gateway.config import UpstreamConfig
from gateway.hub.topic import Topic
from gateway.metrics import Metrics
from gateway.upstream.job_mux import OptimizationMux


def mux_with(*jobs: str) -> tuple[OptimizationMux, dict[str, Topic]]:
    mux = OptimizationMux(UpstreamConfig(base_url="http://up.test", api_key="k" * 24), Metrics(), clock=lambda: 0.0)
    topics = {}
    for job in jobs:
        topic = Topic(f"optimizations/{job}", capacity=100)
        mux.topics[job] = topic
        mux._upstream[job] = ("subscribed", topic)
        topics[job] = topic
    return mux, topics


def event_message(job: str, event_id: Any, type: str = "iteration_start", **data: Any) -> str:
    return json.dumps({"type": "event", "jobId": job, "event": {"id": event_id, "eventType": type, "iteration": 1,
                                                                 "timestamp": "t", "data": data}})


def test_events_are_published_once_each_and_replays_dropped() -> None:
    mux, topics = mux_with("j1", "j2")
    for event_id in (1, 2, 2, 1, 3):
        mux._handle(event_message("j1", event_id))
    mux._handle(event_message("j2", 1))
    assert [e.id for e in topics["j1"].events] == ["1", "2", "3"]
    assert [e.id for e in topics["j2"].events] == ["1"]
    published = strict_json_loads(topics["j1"].events[0].data)
    assert isinstance(published, dict) and published["eventType"] == "iteration_start"


def test_a_terminal_event_ends_the_job_and_forgets_its_upstream_subscription() -> None:
    mux, topics = mux_with("j1")
    mux._handle(event_message("j1", 1, "job_complete"))
    assert topics["j1"].ended and "j1" not in mux._upstream


def test_junk_is_ignored_without_raising() -> None:
    mux, topics = mux_with("j1")
    for junk in ("not json", "[]", "{}", '{"type":"event"}', '{"type":"event","jobId":"j1","event":7}',
                 event_message("j1", True), event_message("j1", "a b"), event_message("j1", 1, "bad type"),
                 event_message("unknown-job", 1), '{"type":"event","jobId":"j1","event":{"id":1e400}}',
                 "[" * 100_000):
        mux._handle(junk)
    assert topics["j1"].events == []


def test_nan_and_infinity_become_null() -> None:
    mux, topics = mux_with("j1")
    mux._handle('{"type":"event","jobId":"j1","event":{"id":1,"eventType":"evaluation_complete","iteration":1,'
                '"timestamp":"t","data":{"score":NaN,"best":-Infinity}}}')
    [event] = topics["j1"].events
    assert strict_json_loads(event.data) == {"id": 1, "eventType": "evaluation_complete", "iteration": 1,
                                             "timestamp": "t", "data": {"score": None, "best": None}}


async def test_not_found_ends_the_job_and_stream_already_open_is_retried_later() -> None:
    mux, topics = mux_with("gone", "busy")
    mux._handle(json.dumps({"type": "error", "jobId": "gone", "error": {"code": "not_found", "message": "x"}}))
    assert topics["gone"].end_reason is UPSTREAM_FAILED and topics["gone"].end_detail == "upstream answered not_found"
    mux._handle(json.dumps({"type": "error", "jobId": "busy",
                            "error": {"code": "stream_already_open", "message": "x"}}))
    assert not topics["busy"].ended and "busy" not in mux._upstream and "busy" in mux._retry_at
    await mux.aclose()


def test_events_of_a_dropped_subscription_are_ignored() -> None:
    mux, topics = mux_with("j1")
    mux._upstream["j1"] = ("unsubscribing", topics["j1"])
    mux._handle(event_message("j1", 1))
    mux._handle(json.dumps({"type": "unsubscribed", "jobId": "j1"}))
    assert topics["j1"].events == [] and "j1" not in mux._upstream


async def test_each_job_reports_its_upstream_state_for_operators() -> None:
    mux, topics = mux_with("live", "busy", "done")
    waiting = Topic("optimizations/new", capacity=10)
    mux.topics["new"] = waiting  # attached, its subscribe not sent yet
    mux._handle(json.dumps({"type": "error", "jobId": "busy",
                            "error": {"code": "stream_already_open", "message": "x"}}))
    mux._handle(event_message("done", 1, "job_complete"))
    described = {job: mux.describe(topic) for job, topic in {**topics, "new": waiting}.items()}
    assert {job: d["state"] for job, d in described.items()} == {
        "live": "subscribed", "busy": "backing_off", "done": "ended", "new": "subscribing"}
    assert described["busy"]["attempt"] == 1 and described["busy"]["retry_in"] >= 0
    assert described["live"]["connection"] == {"state": "connecting", "attempt": 0, "retry_in": None}
    stale = Topic("optimizations/live", capacity=10)  # an older topic the hub replaced
    assert mux.describe(stale)["state"] == "ended"
    await mux.aclose()
