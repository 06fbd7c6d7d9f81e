"""The one admission path (unit): what it takes, and that every hold is released exactly once on every path."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.auth.admission import Admission, Admitted
from gateway.auth.authz import Authorizer
from gateway.auth.tokens import Authenticator, Principal, mint_token
from gateway.codec.closes import SUPERSEDED
from gateway.config import AuthConfig, JWTConfig, LimitsConfig, ServerConfig
from gateway.errors import AuthError, LimitError
from gateway.hub.registry import Hub
from gateway.limits.connections import ConnectionLimiter
from gateway.limits.exclusive import Closable, ExclusiveStreams
from gateway.limits.quota import StreamQuota
from gateway.metrics import Metrics

SECRET = "s" * 48


class Broker:
    def attach(self, topic: Any) -> None:
        return None

    async def detach(self, topic: Any) -> None:
        return None


class SlowCluster:
    """A cluster-wide claim that takes as long as the test wants (Redis, say)."""

    def __init__(self) -> None:
        self.release_claim = asyncio.Event()
        self.released: list[str] = []

    async def acquire(self, consumer: str, resource: str, sub: Closable) -> None:
        await self.release_claim.wait()

    async def release(self, consumer: str, resource: str, sub: Closable) -> None:
        self.released.append(resource)


def build(policy: str = "replace", cluster: Any = None, **limits: Any) -> tuple[Admission, Hub, Metrics]:
    metrics = Metrics()
    config = LimitsConfig(one_stream_per_consumer=policy, **limits)  # type: ignore[arg-type]
    hub = Hub(config, Broker(), metrics)
    auth = AuthConfig(jwt=JWTConfig(secret=SECRET))
    server = ServerConfig(max_connections_per_consumer=2)
    admission = Admission(server, Authenticator(auth), Authorizer(auth), metrics, hub=hub,
                          limiter=ConnectionLimiter(server), quota=StreamQuota(config.max_streams_per_consumer),
                          exclusive=ExclusiveStreams(config, cluster=cluster))
    return admission, hub, metrics


def admitted(consumer: str = "alice", streams: tuple[str, ...] = ("evaluations/*",)) -> Admitted:
    return Admitted(Principal(consumer, {}, 4e9, streams), "10.0.0.1", None, False)


def rejections(metrics: Metrics, limit: str) -> float:
    return metrics.registry.get_sample_value("gateway_limit_rejections_total", {"limit": limit}) or 0.0


async def test_admit_reads_the_token_and_the_client_address() -> None:
    admission, _, _ = build()
    token = mint_token(SECRET, "HS256", "alice", 60, {"streams": ["evaluations/*"]})
    scope = {"type": "http", "client": ("10.1.2.3", 5000), "query_string": b""}
    result = await admission.admit(scope, {"authorization": f"Bearer {token}"})
    assert (result.consumer, result.client_ip, result.cookie_auth) == ("alice", "10.1.2.3", False)
    with pytest.raises(AuthError) as refused:
        await admission.admit(scope, {})
    assert refused.value.status == 401 and refused.value.code == "missing_token"


async def test_a_stream_holds_its_subscription_slot_and_claim_until_released_once() -> None:
    admission, hub, _ = build()
    who = admitted()
    hold = await admission.join(who, "evaluations/e1", None)
    await hold.claim()
    assert admission.quota.held("alice") == 1 and hold.sub in hub.topics["evaluations/e1"].subscribers
    hold.release()
    hold.release()  # idempotent: released once
    assert admission.quota.held("alice") == 0 and not hub.topics["evaluations/e1"].subscribers
    assert admission.exclusive._open == {}


async def test_a_join_that_needs_no_stream_claims_nothing_and_supersedes_nobody() -> None:
    admission, _, _ = build()
    who = admitted()
    first = await admission.join(who, "evaluations/e1", None)
    await first.claim()
    probe = await admission.join(who, "evaluations/e1", None)  # e.g. a resume after the stream's end: 204
    probe.release()
    assert not first.sub.closed and admission.quota.held("alice") == 1
    second = await admission.join(who, "evaluations/e1", None)
    await second.claim()
    assert first.sub.closed and first.sub.close_reason is SUPERSEDED


async def test_refusals_are_counted_once_and_take_nothing() -> None:
    admission, hub, metrics = build(policy="reject", max_streams_per_consumer=1)
    who = admitted()
    held = await admission.join(who, "evaluations/e1", None)
    await held.claim()
    with pytest.raises(LimitError) as duplicate:
        await admission.join(who, "evaluations/e1", None)
    assert duplicate.value.code == "stream_already_open"
    with pytest.raises(LimitError) as over:
        await admission.join(who, "evaluations/e2", None)
    assert over.value.code == "too_many_streams" and over.value.status == 429
    with pytest.raises(AuthError):
        await admission.join(who, "optimizations/j1", None)  # not granted by the streams claim
    assert rejections(metrics, "one_stream_per_consumer") == 1 and rejections(metrics, "max_streams_per_consumer") == 1
    assert set(hub.topics) == {"evaluations/e1"} and admission.quota.held("alice") == 1
    c1, c2 = admission.connection(who), admission.connection(who)
    with pytest.raises(LimitError):
        admission.connection(who)
    c1.release()
    c1.release()
    admission.connection(who).release()
    c2.release()
    assert admission.limiter.total == 0 and rejections(metrics, "max_connections_per_consumer") == 1


async def test_the_stream_cap_is_a_503_limit() -> None:
    admission, _, metrics = build(max_streams=1)
    await admission.join(admitted("a"), "evaluations/e1", None)
    with pytest.raises(LimitError) as full:
        await admission.join(admitted("b"), "evaluations/e2", None)
    assert (full.value.status, full.value.code) == (503, "over_capacity")
    assert rejections(metrics, "max_streams") == 1


async def test_a_claim_cancelled_midway_releases_everything() -> None:
    cluster = SlowCluster()
    admission, hub, _ = build(cluster=cluster)
    hold = await admission.join(admitted(), "evaluations/e1", None)
    claiming = asyncio.create_task(hold.claim())
    await asyncio.sleep(0)
    assert admission.quota.held("alice") == 1
    claiming.cancel()
    with pytest.raises(asyncio.CancelledError):
        await claiming
    assert hold.released and admission.quota.held("alice") == 0
    assert not hub.topics["evaluations/e1"].subscribers


async def test_a_verified_token_is_remembered_until_it_expires() -> None:
    """A reconnect with the same token costs a lookup, not a signature check; expiry still applies."""
    clock = [time.time()]
    auth = AuthConfig(jwt=JWTConfig(secret=SECRET, leeway=0))
    authenticator = Authenticator(auth, clock=lambda: clock[0])
    token = mint_token(SECRET, "HS256", "alice", 60, {"streams": ["*/*"]}, clock=lambda: clock[0])
    calls = []
    real = authenticator._verify

    async def counting(value: str) -> Any:
        calls.append(value)
        return await real(value)

    authenticator._verify = counting  # type: ignore[method-assign]
    first = await authenticator.authenticate(token)
    second = await authenticator.authenticate(token)
    assert second is first and len(calls) == 1
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    with pytest.raises(AuthError):
        await authenticator.authenticate(tampered)  # another token: verified (and refused), never the cached one
    calls.clear()
    clock[0] += 61
    await authenticator.authenticate(token)  # past its exp by the cache's clock: never served from the cache
    assert calls == [token]
