"""Everything one simulator instance remembers: runs, overrides, stream claims, live connections, stats.

One `SimState` per app (no module globals), so tests build isolated simulators. Runs start on
first touch as one task each; the state owns those tasks and cancels them on reset and shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from gateway.sim.evaluations import EvaluationRun
from gateway.sim.optimizations import JobRun
from gateway.sim.settings import ResourceOverrides, SimSettings

EVALUATION_KINDS = ("evaluations", "trace-evaluations")
RESOURCE_KINDS = (*EVALUATION_KINDS, "optimizations")


def is_missing(resource_id: str) -> bool:
    """Ids starting with "missing" do not exist; every other id does."""
    return resource_id.startswith("missing")


def split_resource(resource: str) -> tuple[str, str]:
    """("evaluations", "e1") from "evaluations/e1"; ValueError for anything else."""
    kind, sep, resource_id = resource.partition("/")
    if not sep or kind not in RESOURCE_KINDS or not resource_id or "/" in resource_id:
        raise ValueError(f"resource must look like '<{'|'.join(RESOURCE_KINDS)}>/<id>', got {resource!r}")
    return kind, resource_id


@dataclass(slots=True)
class StreamStats:
    """Counters of one resource, or of WebSocket connections as a whole."""

    connects: int = 0
    open: int = 0
    max_concurrent: int = 0
    rejected: int = 0
    polls: int = 0

    def opened(self) -> None:
        self.connects += 1
        self.open += 1
        self.max_concurrent = max(self.max_concurrent, self.open)

    def closed(self) -> None:
        self.open -= 1


class Droppable(Protocol):
    """A live upstream connection that `/_sim/drop` can cut."""

    def holds(self, resource: str) -> bool: ...

    def drop(self, mode: str) -> None: ...


class SimState:
    """The simulator's memory; see the module docstring."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self._evaluations: dict[str, EvaluationRun] = {}
        self._jobs: dict[str, JobRun] = {}
        self._overrides: dict[str, ResourceOverrides] = {}
        self._claims: dict[tuple[str, str], object] = {}
        self._stats: dict[str, StreamStats] = {}
        self.ws_stats = StreamStats()
        self._live: set[Droppable] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- runs ------------------------------------------------------------------------------------

    def overrides(self, resource: str) -> ResourceOverrides:
        return self._overrides.get(resource, ResourceOverrides())

    def configure(self, resource: str, overrides: ResourceOverrides) -> bool:
        """Set a resource's overrides; False if it already started (its script is fixed by then)."""
        if resource in self._evaluations or resource in self._jobs:
            return False
        self._overrides[resource] = overrides
        return True

    def peek_evaluation(self, kind: str, evaluation_id: str) -> EvaluationRun | None:
        return self._evaluations.get(f"{kind}/{evaluation_id}")

    def evaluation(self, kind: str, evaluation_id: str) -> EvaluationRun:
        """The run of an evaluation, started now if this is its first touch."""
        key = f"{kind}/{evaluation_id}"
        run = self._evaluations.get(key)
        if run is None:
            o = self.overrides(key)
            run = EvaluationRun(
                kind, evaluation_id,
                rows=self.settings.rows if o.rows is None else o.rows,
                interval=self.settings.interval if o.interval is None else o.interval,
                fail=("fail" in evaluation_id) if o.fail is None else o.fail,
            )
            self._evaluations[key] = run
            self._start(run.run())
        return run

    def peek_job(self, job_id: str) -> JobRun | None:
        return self._jobs.get(job_id)

    def job(self, job_id: str) -> JobRun:
        """The run of an optimization job, started now if this is its first touch."""
        run = self._jobs.get(job_id)
        if run is None:
            o = self.overrides(f"optimizations/{job_id}")
            run = JobRun(
                job_id,
                iterations=self.settings.iterations if o.iterations is None else o.iterations,
                interval=self.settings.job_interval if o.interval is None else o.interval,
                fail=("fail" in job_id) if o.fail is None else o.fail,
                cancel=("cancel" in job_id) if o.cancel is None else o.cancel,
                pause=("pause" in job_id) if o.pause is None else o.pause,
            )
            self._jobs[job_id] = run
            self._start(run.run())
        return run

    def inactivity_timeout(self, resource: str) -> float:
        override = self.overrides(resource).inactivity_timeout
        return self.settings.inactivity_timeout if override is None else override

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one stream per resource per API key -----------------------------------------------------

    def claim(self, resource: str, api_key: str, owner: object) -> bool:
        """Reserve `resource` for `owner`; False (and a rejection counted) if another stream holds it."""
        stats = self.stats(resource)
        if (resource, api_key) in self._claims:
            stats.rejected += 1
            return False
        self._claims[(resource, api_key)] = owner
        stats.opened()
        return True

    def release(self, resource: str, api_key: str, owner: object, stats: StreamStats) -> None:
        """Undo `claim`; `stats` is the object `claim` counted in, so a reset in between stays consistent."""
        if self._claims.get((resource, api_key)) is owner:
            del self._claims[(resource, api_key)]
        stats.closed()

    # -- live connections and stats --------------------------------------------------------------

    def stats(self, resource: str) -> StreamStats:
        stats = self._stats.get(resource)
        if stats is None:
            stats = self._stats[resource] = StreamStats()
        return stats

    def add_live(self, connection: Droppable) -> None:
        self._live.add(connection)

    def remove_live(self, connection: Droppable) -> None:
        self._live.discard(connection)

    def drop(self, resource: str | None, mode: str) -> int:
        """Cut every live connection serving `resource` (all when None); returns how many."""
        victims = [c for c in self._live if resource is None or c.holds(resource)]
        for connection in victims:
            connection.drop(mode)
            self._live.discard(connection)
        return len(victims)

    def stats_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {key: asdict(stats) for key, stats in sorted(self._stats.items())}
        body["ws_connections"] = {"connects": self.ws_stats.connects, "open": self.ws_stats.open,
                                  "max_concurrent": self.ws_stats.max_concurrent}
        body["requests"] = {key: {"polls": stats.polls} for key, stats in sorted(self._stats.items())
                            if stats.polls}
        return body

    def listing(self, kind: str) -> list[dict[str, str]]:
        """Listed ids with their REST status; listing does not start anything."""
        if kind == "optimizations":
            jobs = [(job_id, self._jobs.get(job_id)) for job_id in self.settings.job_ids]
            return [{"id": job_id, "status": job.status if job else "pending"} for job_id, job in jobs]
        runs = [(eid, self.peek_evaluation(kind, eid)) for eid in self.settings.evaluation_ids]
        return [{"id": eid, "status": run.snapshot()["status"] if run else "pending"} for eid, run in runs]

    # -- lifecycle -------------------------------------------------------------------------------

    async def reset(self) -> None:
        """Forget everything: cut live connections, stop runs, clear overrides and counters."""
        self.drop(None, "eof")
        await self.aclose()
        self._evaluations.clear()
        self._jobs.clear()
        self._overrides.clear()
        self._claims.clear()
        self._stats.clear()
        self.ws_stats = StreamStats()

    async def aclose(self) -> None:
        """Cancel every run task and wait for it, so nothing outlives the app."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
