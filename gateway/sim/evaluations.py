"""Simulated evaluations and trace evaluations: what they contain and when their events appear.

The content of an evaluation (model, dataset, every row and its score) is a pure function of
its resource key, so the same id gives the same stream in every run. Only the timing is
live: a run starts the first time the id is touched and emits one event per `interval`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from gateway.codec.sse import encode_event
from gateway.sim.timeline import Timeline

_MODELS = (
    ("gpt-4o-mini", "OpenAI"),
    ("claude-3-5-haiku", "Anthropic"),
    ("llama-3.1-8b-instruct", "Meta"),
    ("mistral-small", "Mistral AI"),
)
_DATASETS = ("gsm8k-mini", "mmlu-lite", "arc-easy-sample", "capitals-100")
_CAPITALS = (("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
             ("Norway", "Oslo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Chile", "Santiago"))

REST_STATUS = {"queued": "pending", "running": "in-progress", "completed": "success", "failed": "failure"}
"""Stream status vocabulary mapped onto the REST (polling) one."""


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One SSE event of an evaluation, encoded once so every reader sends the same bytes."""

    id: int
    event: str
    data: dict[str, Any]
    frame: bytes
    terminal: bool


@dataclass(frozen=True, slots=True)
class EvaluationPlan:
    """Everything deterministic about one evaluation."""

    model_id: str
    model_name: str
    model_company: str
    dataset_id: str
    dataset_name: str
    rows: tuple[dict[str, Any], ...]
    fail_after: int | None
    """Rows completed before the run fails, or None for a successful run."""


def _row(rng: random.Random, index: int, skill: float) -> dict[str, Any]:
    subset = rng.choice(("arithmetic", "geography", "reasoning"))
    if subset == "arithmetic":
        a, b = rng.randint(12, 99), rng.randint(12, 99)
        prompt, truth = f"What is {a} + {b}?", str(a + b)
        wrong = str(a + b + rng.choice((-10, -1, 1, 10)))
    elif subset == "geography":
        country, capital = rng.choice(_CAPITALS)
        prompt, truth = f"What is the capital of {country}?", capital
        wrong = rng.choice([c for _, c in _CAPITALS if c != capital])
    else:
        n = rng.randint(3, 9)
        prompt, truth = f"A box holds {n} apples and {n} more are added. How many apples?", str(2 * n)
        wrong = str(2 * n + rng.choice((-1, 1, n)))
    correct = rng.random() < skill
    similarity = 1.0 if correct else round(rng.uniform(0.05, 0.6), 3)
    return {
        "index": index,
        "subset": subset,
        "prompt": prompt,
        "result": truth if correct else wrong,
        "truth": truth,
        "duration": round(rng.uniform(0.15, 2.5), 3),
        "score": 1.0 if correct else 0.0,
        "metrics": {"exact_match": 1.0 if correct else 0.0, "similarity": similarity},
    }


def plan_evaluation(resource_key: str, rows: int, fail: bool) -> EvaluationPlan:
    """The content of the evaluation `resource_key` (e.g. "evaluations/e1"); pure and repeatable."""
    rng = random.Random(resource_key)  # str seeds hash with SHA-512: stable across processes
    model_name, company = rng.choice(_MODELS)
    dataset = rng.choice(_DATASETS)
    digest = hashlib.sha256(resource_key.encode()).hexdigest()
    skill = rng.uniform(0.55, 0.95)
    return EvaluationPlan(
        model_id=f"model-{digest[:12]}",
        model_name=model_name,
        model_company=company,
        dataset_id=f"dataset-{digest[12:24]}",
        dataset_name=dataset,
        rows=tuple(_row(rng, i, skill) for i in range(rows)),
        fail_after=rows // 2 if fail else None,
    )


class EvaluationRun:
    """One evaluation in simulated real time: a timeline of events and the REST view of its progress."""

    def __init__(self, kind: str, evaluation_id: str, *, rows: int, interval: float, fail: bool) -> None:
        self.kind = kind
        self.id = evaluation_id
        self.key = f"{kind}/{evaluation_id}"
        self.interval = interval
        self.plan = plan_evaluation(self.key, rows, fail)
        self.timeline: Timeline[StreamEvent] = Timeline()
        self.status = "queued"
        self.rows_done: list[dict[str, Any]] = []
        self.submitted_at = int(time.time())
        self.finished_at = 0

    async def run(self) -> None:
        """Emit the whole script, one event per interval; the first one immediately."""
        for index, (event, data, terminal) in enumerate(self._script()):
            if index:
                await asyncio.sleep(self.interval)
            self._emit(event, data(), terminal)

    def _emit(self, event: str, data: dict[str, Any], terminal: bool) -> None:
        event_id = self.timeline.next_id
        frame = encode_event(json.dumps(data, separators=(",", ":")), event=event, id=str(event_id))
        self.timeline.append(StreamEvent(event_id, event, data, frame, terminal), terminal=terminal)

    def _script(self) -> Iterator[tuple[str, Callable[[], dict[str, Any]], bool]]:
        """(event, payload thunk, terminal) in order; thunks run at emission, so payloads show that moment."""
        total = len(self.plan.rows)
        yield "status", lambda: self._set_status("queued"), False
        yield "status", lambda: self._set_status("running"), False
        for index, row in enumerate(self.plan.rows):
            if index == self.plan.fail_after:
                break
            yield "row_complete", functools.partial(self._complete_row, row), False
            yield "progress", lambda: {"rows_complete": len(self.rows_done), "rows_total": total}, False
        if self.plan.fail_after is not None:
            yield "status", lambda: self._set_status("failed"), False
            yield "error", lambda: {"error": {
                "message": f"evaluation {self.id} failed after {len(self.rows_done)} of {total} rows "
                           "(simulated model timeout)",
                "code": "evaluation_failed",
            }}, True
        else:
            yield "status", lambda: self._set_status("completed"), False
            yield "final", lambda: {"result": self.snapshot()}, True

    def _set_status(self, status: str) -> dict[str, Any]:
        self.status = status
        if status in ("completed", "failed"):
            self.finished_at = int(time.time())
        return {"status": status}

    def _complete_row(self, row: dict[str, Any]) -> dict[str, Any]:
        self.rows_done.append(row)
        return {"row": row}

    def snapshot(self) -> dict[str, Any]:
        """The Evaluation object (stratix-python `models/evaluation.py`) as of now."""
        done = self.rows_done
        total = len(self.plan.rows)
        accuracy = sum(r["score"] for r in done) / len(done) if done else 0.0
        average_ms = int(1000 * sum(r["duration"] for r in done) / len(done)) if done else 0
        descriptions = {
            "queued": "Queued",
            "running": f"Running: {len(done)} of {total} rows complete",
            "completed": f"Completed {total} rows",
            "failed": f"Failed after {len(done)} of {total} rows",
        }
        return {
            "id": self.id,
            "status": REST_STATUS[self.status],
            "status_description": descriptions[self.status],
            "submitted_at": self.submitted_at,
            "finished_at": self.finished_at,
            "model_id": self.plan.model_id,
            "model_name": self.plan.model_name,
            "model_key": self.plan.model_name,
            "model_company": self.plan.model_company,
            "dataset_id": self.plan.dataset_id,
            "dataset_name": self.plan.dataset_name,
            "average_duration": average_ms,
            "accuracy": round(accuracy, 4),
            "readability_score": 0.0,
            "toxicity_score": 0.0,
            "ethics_score": 0.0,
            "failed_prompt_count": total - len(done) if self.status == "failed" else 0,
            "queue_id": 0,
            "rows_complete": len(done),
            "rows_total": total,
        }
