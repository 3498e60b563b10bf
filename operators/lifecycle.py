"""A CompressionJob's lifecycle: phases, reasons, and the status each transition writes.

Pure functions from (what happened) to (a status patch). Durable state lives in
`status` (Events expire); `conditions` follow metav1.Condition: one entry per
type, `lastTransitionTime` moving only when the condition's status changes.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any


class Phase(str, enum.Enum):
    PENDING = "Pending"  # created; the operator has not looked at it yet
    QUEUED = "Queued"  # valid, waiting for a free slot (maxConcurrentJobs), by priority then age
    RUNNING = "Running"  # submitted to Ray
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED)


class Reason(str, enum.Enum):
    QUEUED = "Queued"
    SUBMITTED = "Submitted"
    RETRYING = "Retrying"  # the Ray job failed and backoffLimit allows another attempt
    SUBMISSION_RETRYING = "SubmissionRetrying"  # Ray did not answer; trying again
    COMPLETED = "Completed"
    INVALID_SPEC = "InvalidSpec"
    SUBMISSION_FAILED = "SubmissionFailed"
    JOB_FAILED = "JobFailed"
    JOB_STOPPED = "JobStopped"  # stopped outside the operator
    JOB_LOST = "JobLost"  # Ray no longer knows the submission (the cluster was replaced)
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    CANCELLED = "Cancelled"


def phase_of(status: dict[str, Any] | None) -> Phase:
    value = (status or {}).get("phase")
    return Phase(value) if value in {p.value for p in Phase} else Phase.PENDING


def now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(value: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def condition(kind: str, true: bool, reason: Reason, message: str, previous: list[dict[str, Any]] | None, at: str) -> list[dict]:
    """`previous` conditions with `kind` set; the transition time moves only when its status flips."""
    status = "True" if true else "False"
    old = next((c for c in previous or [] if c.get("type") == kind), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else at
    entry = {"type": kind, "status": status, "reason": reason.value, "message": message[:1024], "lastTransitionTime": since}
    return [c for c in previous or [] if c.get("type") != kind] + [entry]


def transition(status: dict[str, Any] | None, phase: Phase, reason: Reason, message: str, **fields: Any) -> dict[str, Any]:
    """The status patch for moving to `phase`: phase, reason, message, times, conditions, plus `fields`."""
    at = now()
    conditions = (status or {}).get("conditions") or []
    conditions = condition("Ready", phase is Phase.SUCCEEDED, reason, message, conditions, at)
    conditions = condition("Running", phase is Phase.RUNNING, reason, message, conditions, at)
    conditions = condition("Failed", phase is Phase.FAILED, reason, message, conditions, at)
    patch: dict[str, Any] = {"phase": phase.value, "reason": reason.value, "message": message, "conditions": conditions, **fields}
    if phase is Phase.RUNNING and not (status or {}).get("startTime"):
        patch["startTime"] = at
    if phase.terminal:
        patch["endTime"] = at
    return patch


EVENT_TYPE = {Phase.FAILED: "Warning", Phase.CANCELLED: "Warning"}


def event_type(phase: Phase, reason: Reason) -> str:
    """Kubernetes Event type for a transition: failures and retries warn, the rest is Normal."""
    if reason in (Reason.RETRYING, Reason.SUBMISSION_RETRYING):
        return "Warning"
    return EVENT_TYPE.get(phase, "Normal")
