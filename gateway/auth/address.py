"""Who a request comes from, and where it was sent: headers, query, client address and own origin.

Behind `server.trusted_proxies` the client address comes from `X-Forwarded-For`, and the
origin the browser addressed (the gateway's own, always allowed) from `X-Forwarded-Proto`
and `X-Forwarded-Host`; from any other peer those headers are ignored.
"""

from __future__ import annotations

import ipaddress
import re
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

    def trusts(self, scope: Scope) -> bool:
        """Whether the request's peer (the socket's other end) is one of the trusted proxies."""
        client = scope.get("client")
        return bool(self._trusted) and client is not None and self._is_trusted(str(client[0]))

    def own_origin(self, scope: Scope, headers: Mapping[str, str]) -> str:
        """The origin this request was addressed to, as the browser saw it (see `own_origin`)."""
        return own_origin(scope, headers, forwarded=self.trusts(scope))

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


_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_PORT = re.compile(r"(.+):([0-9]+)")


def _last_hop(value: str | None) -> str:
    """The value the nearest proxy set: the last of a comma-separated list (earlier ones came from farther away)."""
    return (value or "").rsplit(",", 1)[-1].strip()


def own_origin(scope: Scope, headers: Mapping[str, str], forwarded: bool = False) -> str:
    """The origin this request was addressed to (scheme and Host), which is always allowed.

    With `forwarded` (the peer is a trusted proxy, such as a TLS-terminating load balancer)
    `X-Forwarded-Proto` and `X-Forwarded-Host` say what the browser used, when present and
    well formed. A default port is left out, as browsers leave it out of `Origin`.
    """
    scheme = _SCHEMES.get(scope.get("scheme", "http"), "http")
    host = headers.get("host", "")
    if forwarded:
        proto = _last_hop(headers.get("x-forwarded-proto")).lower()
        scheme = _SCHEMES.get(proto, scheme)
        forwarded_host = _last_hop(headers.get("x-forwarded-host"))
        if _HOST.fullmatch(forwarded_host):
            host = forwarded_host
    explicit = _PORT.fullmatch(host)
    if explicit is not None and explicit.group(2) == _DEFAULT_PORTS[scheme]:
        host = explicit.group(1)
    return f"{scheme}://{host}"
