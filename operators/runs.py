"""What the operator needs from wherever a job runs: submit, read its state, stop it.

Two backends implement it: `ray_jobs.RayJobsBackend` (the Ray Jobs API of an
existing cluster) and `kuberay.KubeRayBackend` (a KubeRay RayJob with its own
cluster). Both are idempotent by submission id, so a retried handler or a
restarted operator never starts a job twice.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from krunch.job_events import JobEvents
from krunch.spec import Executor


class RunPhase(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    MISSING = "MISSING"  # the backend does not know this submission

    @property
    def terminal(self) -> bool:
        return self in (RunPhase.SUCCEEDED, RunPhase.FAILED, RunPhase.STOPPED, RunPhase.MISSING)


@dataclass
class RunState:
    phase: RunPhase
    message: str = ""
    events: JobEvents = field(default_factory=JobEvents)

    def failure_message(self) -> str:
        """The job's own error when it printed one (names the field), else the backend's message."""
        error = self.events.error
        if error:
            return f"{error.get('subject')}: {error.get('reason')}"
        return self.message or f"the job ended {self.phase.value}"


class BackendUnavailable(Exception):
    """The backend did not answer (Ray or the Kubernetes API unreachable): worth retrying."""


class Backend(Protocol):
    executor: ClassVar[Executor]  # which spec.executor this backend serves (metrics, status)

    def submit(self, submission_id: str, job: dict[str, Any], body: dict[str, Any]) -> None: ...

    def state(self, submission_id: str) -> RunState: ...

    def stop(self, submission_id: str) -> None: ...


JOB_ENTRYPOINT = "python -m krunch.job"


def submission_id(uid: str, attempt: int) -> str:
    """One id per resource and attempt: Ray refuses a second job with the same id."""
    return f"krunch-{uid}-{attempt}"


def job_metadata(body: dict[str, Any]) -> dict[str, str]:
    """Stored with the Ray job: which resource it runs for (how an operator or a person finds it in Ray)."""
    meta = body.get("metadata", {})
    return {f"krunch.dev/{key}": str(meta.get(key)) for key in ("uid", "name", "namespace")}


def job_environment(job: dict[str, Any], mlflow_tracking_uri: str | None) -> dict[str, str]:
    """Environment of the job's driver: the job document, where to register, no progress bars (events instead)."""
    import json

    env = {"KRUNCH_JOB": json.dumps(job, separators=(",", ":")), "TQDM_DISABLE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    if mlflow_tracking_uri:
        env["MLFLOW_TRACKING_URI"] = mlflow_tracking_uri
    return env
