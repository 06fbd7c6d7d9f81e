"""Work deferred to one pass per event-loop iteration, shared by every topic and stream."""

from __future__ import annotations

import asyncio
import logging

from gateway.hub.ports import Flushable

log = logging.getLogger("gateway.hub")


class FlushQueue:
    """Work deferred to one pass per event-loop iteration.

    A publish queues its topic here instead of waking every subscriber per event, and an
    idle subscriber's `wake` queues it here instead of waking a task of its own. The pass
    runs after every event of the current upstream read was published, so one wake-up and
    one write per subscriber carry all of them, with no future and no task switch per
    subscriber. Items queued during the pass (the subscribers a topic woke) run in it too.
    """

    #: Passes over newly queued items in one run before the rest waits for the next iteration.
    ROUNDS = 4

    def __init__(self) -> None:
        self._pending: list[Flushable] = []
        self._scheduled = False

    def add(self, item: Flushable) -> None:
        self._pending.append(item)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        try:
            for _ in range(self.ROUNDS):
                pending, self._pending = self._pending, []
                for item in pending:
                    try:
                        item.flush()
                    except Exception:  # one broken subscriber must not starve the others
                        log.exception("flush failed")
                if not self._pending:
                    break
        finally:
            self._scheduled = False
            if self._pending:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._run)
