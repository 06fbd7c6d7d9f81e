"""How the gateway reads the upstream's non-streaming answers: error codes, retryable statuses, redirects.

Nothing here echoes upstream text to a browser or a log line: an error code is passed on only
when it is a plain identifier, and a redirect is described by the origin it pointed at.
"""

from __future__ import annotations

import json
import re

import httpx

#: Statuses that mean "not yet" (the upstream holds our previous stream, or rate-limits us): retried.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
_SAFE_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ERROR_BODY_LIMIT = 4096


def upstream_error_code(body: bytes) -> str | None:
    """The upstream's `error.code`, if it is a plain identifier (never free text that could echo input)."""
    try:
        parsed = json.loads(body[:_ERROR_BODY_LIMIT])
    except (ValueError, RecursionError):
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) and _SAFE_CODE.fullmatch(code) else None


async def read_limited(response: httpx.Response, limit: int) -> bytes | None:
    """The whole body if it is at most `limit` bytes (decoded), else None; never holds more than that."""
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


async def read_prefix(response: httpx.Response, limit: int = _ERROR_BODY_LIMIT) -> bytes:
    """The first `limit` bytes of an error body (enough for its error code), whatever its size."""
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        parts.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(parts)[:limit]


def redirect_target(location: str | None) -> str:
    """The origin a redirect pointed at, for a log line (never its path or query, which may carry secrets)."""
    if not location:
        return "-"
    try:
        url = httpx.URL(location)
    except (httpx.InvalidURL, TypeError, ValueError):
        return "(invalid)"
    if not url.host:
        return "(same origin)"
    return f"{url.scheme}://{url.host}" + (f":{url.port}" if url.port else "")
