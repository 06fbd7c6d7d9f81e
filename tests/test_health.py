"""UpstreamHealth: passive evidence, the recency window, and a rate-limited single-flight probe."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gateway.upstream.health import UpstreamHealth
from tests.servers import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def client_answering(status: int | None, seen: list[httpx.Request], gate: asyncio.Event | None = None
                     ) -> httpx.AsyncClient:
    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if gate is not None:
            await gate.wait()
        if status is None:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(status)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def test_no_evidence_then_success_then_it_ages_out() -> None:
    clock = Clock()
    health = UpstreamHealth(clock, window=30)
    assert health.reachable() is None
    health.success()
    assert health.reachable() is True
    clock.now += 31
    assert health.reachable() is None


def test_a_failure_does_not_outweigh_a_recent_success() -> None:
    clock = Clock()
    health = UpstreamHealth(clock, window=30)
    health.success()
    clock.now += 5
    health.failure("timeout")
    assert health.reachable() is True  # one blip while other requests succeed
    clock.now += 26
    assert health.reachable() is False  # only failures within the window now
    assert health.describe() == {"reachable": False, "last_success_age_seconds": 31.0,
                                 "last_failure_age_seconds": 26.0, "last_error": "timeout"}


@pytest.mark.parametrize(("status", "reachable", "error"),
                         [(401, True, None), (404, True, None), (503, False, "http_5xx"), (None, False, "error")])
async def test_probe_outcomes(status: int | None, reachable: bool, error: str | None) -> None:
    seen: list[httpx.Request] = []
    health = UpstreamHealth(Clock())
    async with client_answering(status, seen) as client:
        await health.refresh(client, "http://upstream.test")
    assert health.reachable() is reachable and health.last_error == error
    assert [str(r.url) for r in seen] == ["http://upstream.test/api/v1/evaluations"]
    assert "x-api-key" not in seen[0].headers  # the probe never carries the key


async def test_probe_is_skipped_when_recent_and_rate_limited_when_failing() -> None:
    clock = Clock()
    seen: list[httpx.Request] = []
    health = UpstreamHealth(clock, probe_interval=5)
    async with client_answering(None, seen) as client:
        health.success()
        await health.refresh(client, "http://upstream.test")
        assert seen == []  # recent passive evidence: no probe
        clock.now += 31
        await health.refresh(client, "http://upstream.test")
        await health.refresh(client, "http://upstream.test")
        assert len(seen) == 1 and health.reachable() is False
        clock.now += 5
        await health.refresh(client, "http://upstream.test")
        assert len(seen) == 2


async def test_concurrent_readiness_checks_share_one_probe() -> None:
    seen: list[httpx.Request] = []
    gate = asyncio.Event()
    health = UpstreamHealth(Clock())
    async with client_answering(200, seen, gate) as client:
        checks = [asyncio.create_task(health.refresh(client, "http://upstream.test")) for _ in range(10)]
        await wait_for(lambda: len(seen) == 1, message="the probe in flight")
        gate.set()
        await asyncio.gather(*checks)
    assert len(seen) == 1 and health.reachable() is True
