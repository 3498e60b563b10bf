"""Run jobs on an existing Ray cluster through the Ray Jobs API (the dashboard's HTTP endpoint).

Progress and the result come from the job's logs (`krunch-event` lines), which
Ray keeps for the job's lifetime, so a restarted operator reads them again.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import requests
from ray.job_submission import JobStatus, JobSubmissionClient

from krunch.operator.runs import JOB_ENTRYPOINT, BackendUnavailable, RunPhase, RunState, job_environment, job_metadata
from krunch.job_events import parse_events
from krunch.spec import Executor

CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 5, 30


class BoundedJobSubmissionClient(JobSubmissionClient):
    """Ray's client with a timeout on every request: an unreachable cluster must not hang a handler."""

    def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        return super()._do_request(method, endpoint, **kwargs)


@lru_cache(maxsize=16)
def _client(address: str) -> JobSubmissionClient:
    return BoundedJobSubmissionClient(address)


def client(address: str) -> JobSubmissionClient:
    try:
        return _client(address)
    except (requests.RequestException, ConnectionError, RuntimeError) as err:
        raise BackendUnavailable(f"Ray Jobs API at {address} did not answer: {_short(err)}") from None


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


class RayJobsBackend:
    executor = Executor.RAY_CLUSTER

    def __init__(self, address: str, mlflow_tracking_uri: str | None) -> None:
        self.address = address
        self.mlflow_tracking_uri = mlflow_tracking_uri

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(client(self.address), method)(*args, **kwargs)
        except requests.RequestException as err:
            _client.cache_clear()
            raise BackendUnavailable(f"Ray Jobs API at {self.address} did not answer: {_short(err)}") from None

    def exists(self, submission_id: str) -> bool:
        try:
            self._call("get_job_info", submission_id)
        except RuntimeError:  # Ray's client says "does not exist" this way
            return False
        return True

    def submit(self, submission_id: str, job: dict[str, Any], body: dict[str, Any]) -> None:
        if self.exists(submission_id):  # submitted before a restart or a retried handler: adopt it
            return
        try:
            self._call(
                "submit_job", entrypoint=JOB_ENTRYPOINT, submission_id=submission_id, entrypoint_num_cpus=0,
                runtime_env={"env_vars": job_environment(job, self.mlflow_tracking_uri)},
                metadata=job_metadata(body),
            )  # fmt: skip
        except RuntimeError as err:
            if "already exists" not in str(err):
                raise BackendUnavailable(f"Ray refused the submission: {_short(err)}") from None

    def state(self, submission_id: str) -> RunState:
        try:
            info = self._call("get_job_info", submission_id)
        except RuntimeError as err:
            return RunState(RunPhase.MISSING, _short(err))
        logs = self._call("get_job_logs", submission_id)
        phase = RunPhase(info.status.value if isinstance(info.status, JobStatus) else str(info.status))
        return RunState(phase, info.message or "", parse_events(logs))

    def stop(self, submission_id: str) -> None:
        try:
            self._call("stop_job", submission_id)
        except RuntimeError:  # gone already
            pass
