"""The line protocol between a running job and whoever watches its logs (the operator).

The job prints one `krunch-event {json}` line per event to stdout; Ray keeps a
job's logs and serves them through the Jobs API, so progress and the result
reach the operator without any extra channel, and survive an operator restart.
Only the standard library here: the operator imports it without torch.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

PREFIX = "krunch-event "


def emit(kind: str, **payload: Any) -> None:
    """Print one event line, flushed at once so the log shows it while the job runs."""
    print(PREFIX + json.dumps({"kind": kind, "time": round(time.time(), 3), **payload}, default=str), file=sys.stdout, flush=True)


@dataclass
class JobEvents:
    """What the events in a log say so far: the latest progress, the stage, the result or the error."""

    done: int | None = None
    total: int | None = None
    stage: str | None = None
    progress_time: float | None = None  # when the job printed the latest progress or stage
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    events: int = 0
    raw: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def progress(self) -> str | None:
        """e.g. '12/30 layers' or '30/30 layers, evaluate'."""
        if self.total is None:
            return self.stage
        text = f"{self.done}/{self.total} layers"
        return f"{text}, {self.stage}" if self.stage and self.done == self.total else text


def parse_events(log: str) -> JobEvents:
    """Read every event line in a log (other lines are ignored; a torn last line is skipped)."""
    state = JobEvents()
    for line in log.splitlines():
        start = line.find(PREFIX)
        if start < 0:
            continue
        try:
            event = json.loads(line[start + len(PREFIX):])
        except json.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        state.events += 1
        state.raw.append(event)
        kind = event.get("kind")
        if kind == "progress":
            state.done, state.total = int(event["done"]), int(event["total"])
            state.progress_time = event.get("time")
        elif kind == "stage":
            state.stage = str(event.get("stage"))
            state.progress_time = event.get("time")
        elif kind == "result":
            state.result = event
        elif kind == "error":
            state.error = event
    return state
