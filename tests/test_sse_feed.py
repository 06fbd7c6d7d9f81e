"""The upstream SSE feed's logic against a scripted, in-memory upstream (httpx.MockTransport).

Each script is a list of answers the "upstream" gives to successive connections; the feed's
reconnects, resume ids, duplicate handling and refusals are checked without sockets. The
same behaviours run end to end against the simulator in test_streaming.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.codec.closes import UPSTREAM_FAILED
from gateway.config import UpstreamConfig
from gateway.hub.topic import Topic
from gateway.metrics import Metrics
from gateway.upstream.backoff import Backoff
from gateway.upstream.sse_feed import SSEFeed

KEY = "evaluations/e1"


class Upstream:
    """Answers the feed's requests from a script, recording what each request carried."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.answers:
            answer: httpx.Response = self.answers.pop(0)
            return answer
        return httpx.Response(200, content=b"id: 99\nevent: final\ndata: {}\n\n")

    def last_event_ids(self) -> list[str | None]:
        return [r.headers.get("last-event-id") for r in self.requests]


def stream(*chunks: bytes) -> httpx.Response:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})


def event(i: int, type: str = "row_complete") -> bytes:
    return f'id: {i}\nevent: {type}\ndata: {{"n":{i}}}\n\n'.encode()


async def run_feed(upstream: Upstream, **config: Any) -> Topic:
    settings: dict[str, Any] = {"base_url": "http://upstream.test", "api_key": "k" * 24, **config}
    topic = Topic(KEY, capacity=1000)
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    feed = SSEFeed(topic, client, UpstreamConfig(**settings), Metrics(), clock=lambda: 0.0,
                   backoff=Backoff(0.0, 0.0))
    try:
        await feed.run()
    finally:
        await client.aclose()
    return topic


async def test_a_drop_resumes_with_last_event_id_and_drops_what_was_already_published() -> None:
    upstream = Upstream(stream(event(1), event(2)),
                        stream(event(2), event(3), event(4, "final")))  # the upstream replays 2
    topic = await run_feed(upstream)
    assert [e.id for e in topic.events] == ["1", "2", "3", "4"]
    assert upstream.last_event_ids() == [None, "2"]
    assert all(r.headers["x-api-key"] == "k" * 24 for r in upstream.requests)


async def test_retryable_statuses_are_retried_and_final_ones_end_the_stream() -> None:
    upstream = Upstream(httpx.Response(503), httpx.Response(429, headers={"retry-after": "0"}),
                        httpx.Response(409), stream(event(1), event(2, "final")))
    topic = await run_feed(upstream)
    assert [e.id for e in topic.events] == ["1", "2"] and len(upstream.requests) == 4
    refused = await run_feed(Upstream(httpx.Response(404, json={"error": {"code": "not_found", "message": "x"}})))
    assert refused.ended and refused.end_reason is UPSTREAM_FAILED
    assert refused.end_detail == "upstream answered 404 (not_found)"


async def test_a_redirect_is_a_failure_and_is_not_followed() -> None:
    upstream = Upstream(httpx.Response(302, headers={"location": "http://elsewhere.test/steal"}))
    topic = await run_feed(upstream)
    assert topic.end_reason is UPSTREAM_FAILED and "302" in (topic.end_detail or "")
    assert [r.url.host for r in upstream.requests] == ["upstream.test"]


async def test_an_event_over_max_event_bytes_fails_the_stream_without_retrying() -> None:
    upstream = Upstream(stream(event(1), b"data: " + b"x" * 5000))
    topic = await run_feed(upstream, max_event_bytes=2048)
    assert [e.id for e in topic.events] == ["1"]
    assert topic.end_reason is UPSTREAM_FAILED and "upstream.max_event_bytes" in (topic.end_detail or "")
    assert len(upstream.requests) == 1


async def test_an_upstream_without_ids_is_numbered_and_resumed_by_position() -> None:
    upstream = Upstream(stream(b"data: a\n\n", b"data: b\n\n"),
                        stream(b"data: a\n\n", b"data: b\n\n", b"data: c\n\n", b"event: final\ndata: d\n\n"))
    topic = await run_feed(upstream)
    assert [(e.id, e.data) for e in topic.events] == [("1", '"a"'), ("2", '"b"'), ("3", '"c"'), ("4", '"d"')]
    assert upstream.last_event_ids() == [None, None]


@pytest.mark.parametrize("bad_id", ["\u00b2", "1\u0663"])
async def test_odd_upstream_ids_never_break_the_feed(bad_id: str) -> None:
    upstream = Upstream(stream(event(1), f"id: {bad_id}\ndata: {{}}\n\n".encode()),
                        stream(f"id: {bad_id}\ndata: {{}}\n\n".encode(), event(3, "final")))
    topic = await run_feed(upstream)
    assert [e.id for e in topic.events] == ["1", bad_id, "3"]


async def test_the_retry_hint_raises_the_next_delay() -> None:
    upstream = Upstream(stream(b"retry: 1\n\n", event(1)), stream(event(2, "final")))
    settings = {"base_url": "http://upstream.test", "api_key": "k" * 24}
    topic = Topic(KEY, capacity=10)
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    feed = SSEFeed(topic, client, UpstreamConfig(**settings), Metrics(), clock=lambda: 0.0, backoff=Backoff(0.0, 0.0))
    try:
        await feed.run()
    finally:
        await client.aclose()
    assert feed.retry_hint == 0.001 and [e.id for e in topic.events] == ["1", "2"]


async def test_retries_honour_retry_after_the_retry_hint_and_read_timeouts() -> None:
    """408/425/429/5xx are retried no sooner than `Retry-After`; a clean end no sooner than `retry:`."""

    async def times_out() -> AsyncIterator[bytes]:
        yield event(1)
        raise httpx.ReadTimeout("the upstream went quiet")

    upstream = Upstream(
        httpx.Response(408), httpx.Response(425), httpx.Response(429, headers={"retry-after": "3"}),
        httpx.Response(503, headers={"retry-after": "2"}),
        httpx.Response(200, content=times_out(), headers={"content-type": "text/event-stream"}),
        stream(b"retry: 4000\n\n", event(2)),  # then a clean end without a terminal event
        stream(event(3, "final")))
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)

    metrics = Metrics()
    topic = Topic(KEY, capacity=100)
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    config = UpstreamConfig(base_url="http://upstream.test", api_key="k" * 24, backoff_initial=0.001, backoff_max=10)
    try:
        await SSEFeed(topic, client, config, metrics, clock=lambda: 0.0, sleep=sleep).run()
    finally:
        await client.aclose()
    assert [e.id for e in topic.events] == ["1", "2", "3"]
    assert len(delays) == 6
    assert delays[2] >= 3 and delays[3] >= 2 and delays[5] >= 4.0  # Retry-After, Retry-After, retry:
    assert max(delays[0], delays[1], delays[4]) < 1  # no hint: the (tiny) backoff
    connects = {reason: metrics.registry.get_sample_value(
        "gateway_upstream_connects_total", {"kind": "evaluations", "reason": reason})
        for reason in ("initial", "http_408", "http_425", "http_429", "http_5xx", "timeout", "eof")}
    assert connects == dict.fromkeys(connects, 1.0)


async def test_the_feed_reports_its_state_for_operators() -> None:
    """connecting, then backing_off (attempt, next retry) after a 503, open while reading, ended after the end."""
    seen: list[tuple[str, dict[str, Any]]] = []
    feeds: list[SSEFeed] = []

    async def body() -> AsyncIterator[bytes]:
        seen.append(("reading", feeds[0].describe()))
        yield event(1)
        yield event(2, "final")

    async def sleep(delay: float) -> None:
        seen.append(("waiting", feeds[0].describe()))

    upstream = Upstream(httpx.Response(503, headers={"retry-after": "2"}),
                        httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"}))
    topic = Topic(KEY, capacity=10)
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    config = UpstreamConfig(base_url="http://upstream.test", api_key="k" * 24, backoff_initial=0.001)
    feed = SSEFeed(topic, client, config, Metrics(), clock=lambda: 10.0, sleep=sleep)
    feeds.append(feed)
    assert feed.describe()["state"] == "connecting"
    try:
        await feed.run()
    finally:
        await client.aclose()
    assert seen == [
        ("waiting", {"state": "backing_off", "attempt": 1, "retry_in": 2.0, "last_reconnect_reason": "http_5xx"}),
        ("reading", {"state": "open", "attempt": 1, "retry_in": None, "last_reconnect_reason": "http_5xx"}),
    ]
    assert feed.describe()["state"] == "ended" and feed.describe()["retry_in"] is None
