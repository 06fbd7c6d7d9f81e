"""Connection caps, one stream per consumer and resource, and the client address behind proxies."""

from __future__ import annotations

import asyncio

import pytest

from gateway.auth.address import ClientAddress
from gateway.codec.closes import SUPERSEDED
from gateway.config import LimitsConfig, ServerConfig
from gateway.errors import LimitError
from gateway.hub.subscription import Subscription
from gateway.hub.topic import Topic
from gateway.limits.connections import ConnectionLimiter
from gateway.limits.exclusive import ExclusiveStreams
from tests.servers import wait_for

RESOURCE = "evaluations/e-1"


def limiter(total: int = 100, per_consumer: int = 100, per_ip: int = 100) -> ConnectionLimiter:
    return ConnectionLimiter(ServerConfig(max_connections=total, max_connections_per_consumer=per_consumer,
                                          max_connections_per_ip=per_ip))


class TestConnectionLimiter:
    def test_total_cap_is_503_over_capacity(self) -> None:
        limits = limiter(total=2)
        with limits.hold("alice", "10.0.0.1"), limits.hold("bob", "10.0.0.2"):
            with pytest.raises(LimitError) as info:
                limits.check("carol", "10.0.0.3")
            error = info.value
            assert (error.status, error.code, error.reason) == (503, "over_capacity", "max_connections")
            assert error.retry_after is not None and error.retry_after > 0
            assert (b"retry-after", b"5") in error.headers()

    def test_per_consumer_cap_is_429_with_retry_after(self) -> None:
        limits = limiter(per_consumer=2)
        with limits.hold("alice", "10.0.0.1"), limits.hold("alice", "10.0.0.2"):
            with pytest.raises(LimitError) as info:
                limits.check("alice", "10.0.0.3")
            error = info.value
            assert (error.status, error.code, error.reason) == (429, "too_many_connections",
                                                                 "max_connections_per_consumer")
            assert error.retry_after is not None and error.retry_after > 0
            assert any(name == b"retry-after" for name, _ in error.headers())
            limits.check("bob", "10.0.0.3")  # other consumers are unaffected

    def test_per_ip_cap_is_429_with_retry_after(self) -> None:
        limits = limiter(per_ip=1)
        with limits.hold("alice", "10.0.0.1"):
            with pytest.raises(LimitError) as info:
                limits.check("bob", "10.0.0.1")
            assert (info.value.status, info.value.reason) == (429, "max_connections_per_ip")
            assert info.value.retry_after is not None
            limits.check("bob", "10.0.0.2")

    def test_hold_refuses_without_counting(self) -> None:
        limits = limiter(per_consumer=1)
        with limits.hold("alice", "10.0.0.1"):
            with pytest.raises(LimitError), limits.hold("alice", "10.0.0.2"):
                pytest.fail("the body must not run past a cap")
            assert (limits.total, limits.per_consumer["alice"], limits.per_ip["10.0.0.2"]) == (1, 1, 0)

    def test_hold_counts_and_releases(self) -> None:
        limits = limiter()
        with limits.hold("alice", "10.0.0.1"):
            assert (limits.total, limits.per_consumer["alice"], limits.per_ip["10.0.0.1"]) == (1, 1, 1)
        assert limits.total == 0
        assert "alice" not in limits.per_consumer and "10.0.0.1" not in limits.per_ip

    def test_hold_releases_on_exception(self) -> None:
        limits = limiter(total=1)
        with pytest.raises(RuntimeError, match="stream broke"), limits.hold("alice", "10.0.0.1"):
            raise RuntimeError("stream broke")
        assert limits.total == 0 and not limits.per_consumer and not limits.per_ip
        with limits.hold("alice", "10.0.0.1"):  # the slot is free again
            pass

    async def test_hold_releases_on_cancellation(self) -> None:
        limits = limiter(total=1)

        async def stream() -> None:
            with limits.hold("alice", "10.0.0.1"):
                await asyncio.Event().wait()

        task = asyncio.create_task(stream())
        await wait_for(lambda: limits.total == 1, timeout=2, message="slot taken")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert limits.total == 0


def subscription() -> Subscription:
    return Subscription(Topic(RESOURCE, capacity=10), 0, 0.0)


class TestExclusiveStreams:
    def test_replace_closes_the_older_stream_as_superseded(self) -> None:
        streams = ExclusiveStreams(LimitsConfig(one_stream_per_consumer="replace"))
        old, new = subscription(), subscription()
        woken: list[int] = []
        old.wake = lambda: woken.append(1)
        streams.claim("alice", RESOURCE, old)
        streams.claim("alice", RESOURCE, new)
        assert old.closed and old.close_reason is SUPERSEDED
        assert not SUPERSEDED.reconnect
        assert woken
        assert not new.closed

    def test_replace_leaves_other_consumers_and_resources_alone(self) -> None:
        streams = ExclusiveStreams(LimitsConfig(one_stream_per_consumer="replace"))
        alice, bob, alice_other = subscription(), subscription(), subscription()
        streams.claim("alice", RESOURCE, alice)
        streams.claim("bob", RESOURCE, bob)
        streams.claim("alice", "evaluations/e-2", alice_other)
        assert not any(s.closed for s in (alice, bob, alice_other))

    def test_reclaiming_the_same_subscription_is_harmless(self) -> None:
        streams = ExclusiveStreams(LimitsConfig(one_stream_per_consumer="replace"))
        sub = subscription()
        streams.claim("alice", RESOURCE, sub)
        streams.claim("alice", RESOURCE, sub)
        assert not sub.closed

    def test_reject_refuses_a_second_stream_with_409(self) -> None:
        streams = ExclusiveStreams(LimitsConfig(one_stream_per_consumer="reject"))
        first = subscription()
        streams.claim("alice", RESOURCE, first)
        for attempt in (lambda: streams.check("alice", RESOURCE),
                        lambda: streams.claim("alice", RESOURCE, subscription())):
            with pytest.raises(LimitError) as info:
                attempt()
            assert (info.value.status, info.value.code) == (409, "stream_already_open")
        assert not first.closed
        streams.check("bob", RESOURCE)
        streams.check("alice", "evaluations/e-2")

    def test_reject_allows_a_new_stream_once_the_old_one_closed(self) -> None:
        streams = ExclusiveStreams(LimitsConfig(one_stream_per_consumer="reject"))
        first = subscription()
        streams.claim("alice", RESOURCE, first)
        first.close(None)
        streams.claim("alice", RESOURCE, subscription())

    def test_reject_allows_a_new_stream_after_release(self) -> None:
        streams = ExclusiveStreams(LimitsConfig(one_stream_per_consumer="reject"))
        first = subscription()
        streams.claim("alice", RESOURCE, first)
        streams.release("alice", RESOURCE, first)
        streams.check("alice", RESOURCE)

    def test_release_by_a_superseded_stream_keeps_the_newer_claim(self) -> None:
        streams = ExclusiveStreams(LimitsConfig(one_stream_per_consumer="replace"))
        old, new, newest = subscription(), subscription(), subscription()
        streams.claim("alice", RESOURCE, old)
        streams.claim("alice", RESOURCE, new)
        streams.release("alice", RESOURCE, old)  # the old stream's cleanup runs after the new claim
        streams.claim("alice", RESOURCE, newest)
        assert new.close_reason is SUPERSEDED


class TestClientAddress:
    def test_no_trusted_proxies_means_the_peer(self) -> None:
        assert ClientAddress([]).resolve("203.0.113.5", "198.51.100.7") == "203.0.113.5"

    def test_untrusted_peer_forwarded_for_is_ignored(self) -> None:
        resolver = ClientAddress(["10.0.0.0/8"])
        assert resolver.resolve("203.0.113.5", "198.51.100.7") == "203.0.113.5"

    def test_trusted_peer_without_header(self) -> None:
        resolver = ClientAddress(["10.0.0.0/8"])
        assert resolver.resolve("10.0.0.1", None) == "10.0.0.1"
        assert resolver.resolve("10.0.0.1", "") == "10.0.0.1"
        assert resolver.resolve("10.0.0.1", " , ") == "10.0.0.1"

    def test_rightmost_untrusted_hop_wins(self) -> None:
        resolver = ClientAddress(["10.0.0.0/8", "192.168.1.1"])
        # The leftmost entry is whatever the client claimed; only hops our proxies appended count.
        header = "1.1.1.1, 198.51.100.7, 192.168.1.1, 10.0.0.2"
        assert resolver.resolve("10.0.0.1", header) == "198.51.100.7"

    def test_single_hop(self) -> None:
        assert ClientAddress(["10.0.0.0/8"]).resolve("10.0.0.1", "198.51.100.7") == "198.51.100.7"

    def test_every_hop_trusted_gives_the_first(self) -> None:
        resolver = ClientAddress(["10.0.0.0/8"])
        assert resolver.resolve("10.0.0.1", "10.1.1.1, 10.2.2.2") == "10.1.1.1"

    def test_ipv6(self) -> None:
        resolver = ClientAddress(["fd00::/8"])
        assert resolver.resolve("fd00::1", "2001:db8::7, fd00::2") == "2001:db8::7"
        assert resolver.resolve("2001:db8::9", "2001:db8::7") == "2001:db8::9"

    def test_non_ip_peer_is_not_trusted(self) -> None:
        assert ClientAddress(["10.0.0.0/8"]).resolve("unix-socket", "198.51.100.7") == "unix-socket"
