"""Simulated optimization jobs: the seed's twelve event types in simulated real time.

A job's scores and prompts are drawn from a generator seeded with its id, so they repeat
run after run. The id picks the outcome: "fail" fails midway, "cancel" is cancelled midway,
"pause" pauses itself after iteration 2 and resumes a few intervals later. Operators can
also pause, resume and cancel any job; commands wake the job at once, not at the next tick.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.sim.timeline import Timeline

TERMINAL_EVENTS = frozenset({"job_complete", "job_failed", "job_cancelled"})
AUTO_PAUSE_INTERVALS = 3
"""How many job intervals a self-pausing ("pause" in its id) job stays paused."""

_MUTATIONS = ("rephrase", "add_examples", "constrain_format", "chain_of_thought", "simplify")
_INSTRUCTIONS = (
    "Think step by step before answering.",
    "Answer with a single word.",
    "Cite the relevant fact first.",
    "Double-check the arithmetic.",
    "Use the examples below as a guide.",
    "Be concise and precise.",
)


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One optimization event; `message` is the whole `event` frame, encoded once for every subscriber."""

    id: int
    event_type: str
    iteration: int | None
    timestamp: str
    data: dict[str, Any]
    message: str
    terminal: bool

    def envelope(self) -> dict[str, Any]:
        return {"id": self.id, "eventType": self.event_type, "iteration": self.iteration,
                "timestamp": self.timestamp, "data": self.data}


class _Stop(Exception):
    """Raised inside the runner when the job must end with a terminal event instead of finishing."""

    def __init__(self, event_type: str, data: dict[str, Any]) -> None:
        super().__init__(event_type)
        self.event_type = event_type
        self.data = data


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobRun:
    """One optimization job; `run()` is its only task and `command()` steers it from outside."""

    def __init__(self, job_id: str, *, iterations: int, interval: float,
                 fail: bool, cancel: bool, pause: bool) -> None:
        self.id = job_id
        self.key = f"optimizations/{job_id}"
        self.iterations = iterations
        self.interval = interval
        self.timeline: Timeline[JobEvent] = Timeline()
        self.status = "pending"
        self.iteration: int | None = None
        self._rng = random.Random(self.key)
        self.baseline = round(self._rng.uniform(0.4, 0.6), 4)
        self.best_score = self.baseline
        self.best_prompt = "Answer the question."
        midway = max(1, (iterations + 1) // 2)
        self._fail_at = midway if fail else None
        self._cancel_at = midway if cancel and not fail else None
        self._pause_at = min(2, iterations) if pause and iterations else None
        self._paused = False
        self._cancel_reason: str | None = None
        self._signal = asyncio.Event()

    # -- steering --------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.timeline.finished

    def command(self, command: str) -> None:
        """Apply an operator command ("pause", "resume", "cancel"); the runner acts on it promptly."""
        if command == "pause":
            self._paused = True
        elif command == "resume":
            self._paused = False
        elif command == "cancel":
            self._cancel_reason = "cancelled by operator"
        else:
            raise ValueError(f"unknown command {command!r}")
        self._signal.set()

    # -- the script ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Emit the job's events until a terminal one."""
        try:
            self.status = "running"
            self._emit("job_started", {"jobId": self.id, "iterations": self.iterations,
                                       "baselineScore": self.baseline})
            for iteration in range(1, self.iterations + 1):
                await self._iteration(iteration)
            await self._step("job_complete", {"results": {
                "bestScore": self.best_score,
                "bestPrompt": self.best_prompt,
                "baselineScore": self.baseline,
                "improvement": round(self.best_score - self.baseline, 4),
                "iterations": self.iterations,
            }})
            self.status = "completed"
        except _Stop as stop:
            self.status = "failed" if stop.event_type == "job_failed" else "cancelled"
            self._emit(stop.event_type, stop.data)

    async def _iteration(self, iteration: int) -> None:
        self.iteration = iteration
        rng = self._rng
        await self._step("iteration_start", {"iteration": iteration})
        instruction = rng.choice(_INSTRUCTIONS)
        prompt = f"{self.best_prompt} {instruction}"
        await self._step("mutation_generated", {"iteration": iteration, "preview": prompt[:80],
                                                "mutationType": rng.choice(_MUTATIONS)})
        await self._step("evaluation_start", {"iteration": iteration})
        if iteration == self._fail_at:
            await self._tick()
            raise _Stop("job_failed", {"error": {"message": f"evaluation of iteration {iteration} crashed "
                                                            "(simulated worker failure)",
                                                 "code": "optimization_failed"}})
        score = round(min(0.99, max(0.0, self.best_score + rng.uniform(-0.08, 0.1))), 4)
        await self._step("evaluation_complete", {"iteration": iteration, "score": score, "metrics": {
            "accuracy": score, "f1": round(score * rng.uniform(0.9, 1.0), 4),
            "latencyMs": rng.randint(300, 2400)}})
        if score > self.best_score:
            improvement = round(score - self.best_score, 4)
            self.best_score, self.best_prompt = score, prompt
            await self._step("new_best", {"iteration": iteration, "score": score, "improvement": improvement,
                                          "prompt": prompt})
        await self._step("iteration_complete", {"iteration": iteration, "bestScore": self.best_score})
        if iteration == self._cancel_at:
            await self._tick()
            raise _Stop("job_cancelled", {"reason": "cancelled by user (simulated)"})
        if iteration == self._pause_at:
            await self._tick()
            self._paused = True
            await self._checkpoint(auto_resume=True)

    async def _step(self, event_type: str, data: dict[str, Any]) -> None:
        await self._tick()
        await self._checkpoint()
        self._emit(event_type, data)

    async def _tick(self) -> None:
        """Wait one interval, or less if an operator command arrives."""
        self._signal.clear()
        if self._paused or self._cancel_reason is not None:
            return
        try:
            async with asyncio.timeout(self.interval):
                await self._signal.wait()
        except TimeoutError:
            pass

    async def _checkpoint(self, *, auto_resume: bool = False) -> None:
        """Honour a pending cancel or pause before the next event; a pause holds here until resumed."""
        if self._cancel_reason is not None:
            raise _Stop("job_cancelled", {"reason": self._cancel_reason})
        if not self._paused:
            return
        reason = "scheduled pause (simulated)" if auto_resume else "paused by operator"
        self.status = "paused"
        self._emit("job_paused", {"iteration": self.iteration, "reason": reason})
        loop = asyncio.get_running_loop()
        resume_at = loop.time() + AUTO_PAUSE_INTERVALS * self.interval if auto_resume else None
        while self._paused and self._cancel_reason is None:
            self._signal.clear()
            timeout = None if resume_at is None else max(0.0, resume_at - loop.time())
            try:
                async with asyncio.timeout(timeout):
                    await self._signal.wait()
            except TimeoutError:
                self._paused = False
        if self._cancel_reason is not None:
            raise _Stop("job_cancelled", {"reason": self._cancel_reason})
        self.status = "running"
        await self._tick()
        self._emit("job_resumed", {"iteration": self.iteration})

    def _emit(self, event_type: str, data: dict[str, Any]) -> None:
        terminal = event_type in TERMINAL_EVENTS
        iteration = None if event_type in ("job_started", "job_complete") else self.iteration
        event_id = self.timeline.next_id
        timestamp = _now_iso()
        envelope = {"id": event_id, "eventType": event_type, "iteration": iteration, "timestamp": timestamp,
                    "data": data}
        message = json.dumps({"type": "event", "jobId": self.id, "event": envelope}, separators=(",", ":"))
        self.timeline.append(JobEvent(event_id, event_type, iteration, timestamp, data, message, terminal),
                             terminal=terminal)

    def snapshot(self) -> dict[str, Any]:
        """The job's state for polling (`GET /api/v1/optimizations/{id}`)."""
        return {"id": self.id, "status": self.status, "iteration": self.iteration,
                "iterations": self.iterations, "bestScore": self.best_score,
                "baselineScore": self.baseline, "events": len(self.timeline)}
