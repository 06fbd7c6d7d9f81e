"""Where bearer tokens come from: a fixed string, or a callable asked again on every connect.

A callable lets short-lived session tokens work: each (re)connect, including the one after
a `token_expired` close or a 401, sends whatever the caller's token source says now.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

TokenSource = str | Callable[[], str | Awaitable[str]]
"""A token, or a sync or async callable returning a fresh one."""


class Credentials:
    """Turns a `TokenSource` into `Authorization` headers."""

    def __init__(self, token: TokenSource) -> None:
        if isinstance(token, str) and not token:
            raise ValueError("token must not be empty")
        self._token = token

    @property
    def refreshable(self) -> bool:
        """Whether asking again can give a different token (worth one retry after a 401)."""
        return not isinstance(self._token, str)

    async def headers(self) -> dict[str, str]:
        token = self._token
        if not isinstance(token, str):
            value = token()
            token = await value if inspect.isawaitable(value) else value
        return {"Authorization": f"Bearer {token}"}
