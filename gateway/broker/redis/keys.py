"""Every Redis key and entry id the shared broker uses (pure)."""

from __future__ import annotations

import base64
import hashlib


def consumer_tag(consumer: str) -> str:
    """A consumer as a key component: fixed length, no separator or brace whatever the token's `sub` holds."""
    digest = hashlib.sha256(consumer.encode("utf-8", "surrogatepass")).digest()[:18]
    return base64.urlsafe_b64encode(digest).decode()


class Keys:
    """Every Redis key the gateway uses, under one configurable prefix.

    A resource's keys all carry the resource as their hash tag (`gw:{evaluations/e1}:log`), so
    they live in one Redis Cluster slot and the Lua scripts may touch several of them. Resource
    ids never contain braces (`streams.resource_key`) and a consumer is hashed (`consumer_tag`),
    so no two (resource, consumer) pairs share a key, whatever `:` either holds.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _tagged(self, resource: str, name: str) -> str:
        return f"{self.prefix}{{{resource}}}:{name}"

    def stream(self, resource: str) -> str:
        # `log`, not the earliest builds' `stream:`: their entry ids were clock readings, these are positions.
        return self._tagged(resource, "log")

    def lease(self, resource: str) -> str:
        return self._tagged(resource, "lease")

    def fence(self, resource: str) -> str:
        return self._tagged(resource, "fence")

    def exclusive(self, consumer: str, resource: str) -> str:
        return self._tagged(resource, f"excl:{consumer_tag(consumer)}")

    def poll(self, resource: str) -> str:
        return self._tagged(resource, "poll")

    def decision(self, consumer: str, resource: str) -> str:
        return self._tagged(resource, f"authz:{consumer_tag(consumer)}")

    @property
    def supersede_channel(self) -> str:
        return f"{self.prefix}supersede"

    @property
    def appended_channel(self) -> str:
        """Where a holder announces that a stream's log grew (the message is the resource)."""
        return f"{self.prefix}appended"


def event_entry_id(ordinal: int) -> str:
    """The Redis id of the event at `ordinal` (1-based position in its resource's sequence)."""
    return f"{ordinal}-0"


def end_entry_id(ordinal: int) -> str:
    """The Redis id of the end that follows the event at `ordinal` (0: before any event)."""
    return f"{ordinal}-1"


def entry_ordinal(entry_id: str) -> int:
    """The position an entry id stands for (its millisecond part)."""
    head, _, _ = entry_id.partition("-")
    return int(head) if head.isascii() and head.isdigit() else 0
