"""Who a request comes from: its headers, its query, and its client address behind trusted proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl

from gateway.types import Scope


def header_map(scope: Scope) -> dict[str, str]:
    """Request headers as a dict (first value wins), names lower-case."""
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
    return headers


def query_value(scope: Scope, name: str) -> str | None:
    """The first value of query parameter `name`, if any."""
    raw = scope.get("query_string", b"")
    if not raw:
        return None
    for key, value in parse_qsl(raw.decode("latin-1")):
        if key == name:
            return str(value)
    return None


def _networks(entries: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(entry, strict=False) for entry in entries]


class ClientAddress:
    """The client's address: the peer, or the first untrusted hop of X-Forwarded-For behind trusted proxies."""

    def __init__(self, trusted_proxies: Iterable[str]) -> None:
        self._trusted = _networks(trusted_proxies)

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def resolve(self, peer: str, forwarded_for: str | None) -> str:
        if not self._trusted or not forwarded_for or not self._is_trusted(peer):
            return peer
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer


def own_origin(scope: Scope, headers: Mapping[str, str]) -> str:
    """The origin this request was addressed to (scheme and Host), which is always allowed."""
    scheme = scope.get("scheme", "http")
    scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    return f"{scheme}://{headers.get('host', '')}"
