"""The append-only event log behind every simulated evaluation and optimization job.

Event ids are 1, 2, 3, ... so an id is also a position: a reader's cursor is simply the
last id it delivered, and resuming is slicing. Readers never block the writer: an append
only sets the `asyncio.Event` each reader registered, and readers pull at their own pace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Generic, TypeVar

ItemT = TypeVar("ItemT")


class Timeline(Generic[ItemT]):
    """Events emitted so far by one resource, plus whether a terminal event closed it."""

    def __init__(self) -> None:
        self._items: list[ItemT] = []
        self._wakers: set[asyncio.Event] = set()
        self.finished = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def next_id(self) -> int:
        return len(self._items) + 1

    def append(self, item: ItemT, *, terminal: bool = False) -> None:
        """Record the next event (its id must be `next_id`) and wake every reader."""
        if self.finished:
            raise RuntimeError("timeline already ended with a terminal event")
        self._items.append(item)
        self.finished = terminal
        for waker in self._wakers:
            waker.set()

    def after(self, cursor: int) -> Sequence[ItemT]:
        """Events whose id is greater than `cursor`."""
        return self._items[cursor:]

    def resume_cursor(self, last_id: object) -> int:
        """Cursor to resume after `last_id`; anything that is not an id we emitted replays from the start."""
        if isinstance(last_id, bool):
            return 0
        if isinstance(last_id, str):
            text = last_id.strip()
            if not (text.isascii() and text.isdigit()):
                return 0
            last_id = int(text)
        if isinstance(last_id, int) and 0 <= last_id <= len(self._items):
            return last_id
        return 0

    def add_waker(self, waker: asyncio.Event) -> None:
        self._wakers.add(waker)

    def remove_waker(self, waker: asyncio.Event) -> None:
        self._wakers.discard(waker)
