"""Stream authorization from the token's `<kind>/<id>` patterns (webhook paths are tested over HTTP elsewhere)."""

from __future__ import annotations

import pytest

from gateway.auth.authz import Authorizer, DecisionCache, pattern_allows
from gateway.auth.tokens import Principal
from gateway.config import AuthConfig, JWTConfig
from gateway.errors import AuthError


class TestPatternAllows:
    @pytest.mark.parametrize(("patterns", "resource"), [
        (["evaluations/*"], "evaluations/e-1"),
        (["evaluations/e-1"], "evaluations/e-1"),
        (["*/*"], "optimizations/job-42"),
        (["*/job-42"], "optimizations/job-42"),
        (["evaluations/e-*"], "evaluations/e-77"),
        (["evaluations/*-final"], "evaluations/run-final"),
        (["evaluations/*"], "evaluations/"),
        (["optimizations/job-1", "evaluations/*"], "evaluations/x"),
        (["trace-evaluations/*"], "trace-evaluations/t.1"),
    ])
    def test_allows(self, patterns: list[str], resource: str) -> None:
        assert pattern_allows(patterns, resource)

    @pytest.mark.parametrize(("patterns", "resource"), [
        ([], "evaluations/e-1"),
        (["evaluations/e-1"], "evaluations/e-2"),
        (["evaluations/e-1"], "evaluations/e-10"),  # exact means exact, not prefix
        (["evaluations/e-10"], "evaluations/e-1"),
        (["evaluations/*"], "optimizations/e-1"),  # kind mismatch
        (["evaluations/*"], "trace-evaluations/e-1"),
        (["evaluations/*"], "evaluations/a/b"),  # '*' does not cross '/'
        (["*/*"], "evaluations/a/b"),
        (["*"], "evaluations/e-1"),  # a pattern without '/' is ignored
        (["evaluations"], "evaluations"),
        (["Evaluations/*"], "evaluations/e-1"),  # case-sensitive
        (["evaluations/e.1"], "evaluations/eX1"),  # regex metacharacters are literal
        (["evaluations/[ab]"], "evaluations/a"),
        (["evaluations/e-1"], "evaluations/e-1\n"),
    ])
    def test_denies(self, patterns: list[str], resource: str) -> None:
        assert not pattern_allows(patterns, resource)

    def test_accepts_any_iterable(self) -> None:
        assert pattern_allows(iter(("evaluations/*",)), "evaluations/x")
        assert pattern_allows(("evaluations/*",), "evaluations/x")


def principal(*streams: str, consumer: str = "alice") -> Principal:
    return Principal(consumer=consumer, claims={"sub": consumer}, expires_at=2e9, streams=streams)


@pytest.fixture
def authorizer() -> Authorizer:
    return Authorizer(AuthConfig(jwt=JWTConfig(secret="s" * 32)))


class TestAuthorizerWithoutWebhook:
    async def test_granted_by_pattern(self, authorizer: Authorizer) -> None:
        await authorizer.check(principal("evaluations/*"), "evaluations/e-1")

    @pytest.mark.parametrize(("streams", "resource"), [
        ((), "evaluations/e-1"),
        (("evaluations/*",), "optimizations/job-1"),
        (("evaluations/e-1",), "evaluations/e-2"),
        (("*",), "evaluations/e-1"),
    ])
    async def test_refused_with_403(self, authorizer: Authorizer, streams: tuple[str, ...], resource: str) -> None:
        with pytest.raises(AuthError) as info:
            await authorizer.check(principal(*streams), resource)
        error = info.value
        assert (error.status, error.code, error.reason) == (403, "forbidden", "forbidden")
        assert resource in error.message
        assert b'"code":"forbidden"' in error.body()

    async def test_refusal_has_no_www_authenticate(self, authorizer: Authorizer) -> None:
        # 403 means "you, but not this": the browser must not be prompted to re-authenticate.
        with pytest.raises(AuthError) as info:
            await authorizer.check(principal(), "evaluations/e-1")
        assert all(name != b"www-authenticate" for name, _ in info.value.headers())

    async def test_no_webhook_client_is_created(self, authorizer: Authorizer) -> None:
        with pytest.raises(AuthError):
            await authorizer.check(principal(), "evaluations/e-1")
        assert authorizer._client is None


class TestDecisionCache:
    async def test_entries_expire(self) -> None:
        now = [100.0]
        cache = DecisionCache(ttl=10.0, clock=lambda: now[0])
        await cache.put("alice", "evaluations/e-1", True)
        await cache.put("alice", "evaluations/e-2", False)
        assert await cache.get("alice", "evaluations/e-1") is True
        assert await cache.get("alice", "evaluations/e-2") is False
        assert await cache.get("bob", "evaluations/e-1") is None
        now[0] = 110.5
        assert await cache.get("alice", "evaluations/e-1") is None

    async def test_zero_ttl_caches_nothing(self) -> None:
        cache = DecisionCache(ttl=0.0)
        await cache.put("alice", "evaluations/e-1", True)
        assert await cache.get("alice", "evaluations/e-1") is None
