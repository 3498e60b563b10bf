"""One step of a CompressionJob's lifecycle per call: admit, start when a slot frees, poll, cancel.

The handlers in `krunch.operator.handlers` delegate here. Every step reads the
durable state from `status` (never from memory alone), so an operator restart
or a replayed watch event resumes where the last process stopped; the only
in-memory state is which jobs this process has just started (`claimed`), until
their Running status comes back through the watch.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

import kopf

from krunch.operator import metrics
from krunch.operator.lifecycle import Phase, Reason, event_type, parse_time, phase_of, transition
from krunch.operator.runs import Backend, BackendUnavailable, RunPhase, RunState, submission_id
from krunch.operator.scheduling import Entry, Key, may_start, queue_position
from krunch.operator.settings import OperatorSettings
from krunch.spec import Executor, SpecError, parse_job


@dataclass
class Scheduler:
    settings: OperatorSettings
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    claimed: set[Key] = field(default_factory=set)
    orphans_checked: set[str] = field(default_factory=set)  # uids whose queued state was checked against Ray


def job_document(body: dict[str, Any]) -> dict[str, Any]:
    """The document the pipeline validates and the Ray job receives: the resource without status."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
        "metadata": {key: meta[key] for key in ("name", "namespace", "uid", "labels") if meta.get(key)},
        "spec": dict(body.get("spec") or {}),
    }  # fmt: skip


def record(body: dict[str, Any], patch: kopf.Patch, status: dict[str, Any], phase: Phase, reason: Reason,
           message: str, **fields: Any) -> None:  # fmt: skip
    """Write the transition into the status patch and emit the matching Event."""
    patch.status.update(transition(status, phase, reason, message, **fields))
    kopf.event(body, type=event_type(phase, reason), reason=reason.value, message=message[:1024])
    if phase is Phase.FAILED:
        metrics.FAILURES.labels(reason.value).inc()


def admit(body: dict[str, Any], status: dict[str, Any], patch: kopf.Patch, settings: OperatorSettings) -> None:
    """Validate with the pipeline's own model; a job the CRD schema let through but the pipeline rejects
    fails here with the pipeline's message and is never submitted."""
    if phase_of(status) is not Phase.PENDING:
        return  # replayed event: already admitted
    try:
        backend_for(body, settings)  # parses the spec, and checks there is somewhere to run it
    except SpecError as err:
        record(body, patch, status, Phase.FAILED, Reason.INVALID_SPEC, str(err))
        raise kopf.PermanentError(f"invalid spec: {err}") from None
    record(body, patch, status, Phase.QUEUED, Reason.QUEUED, "waiting for a free slot")


def backend_for(body: dict[str, Any], settings: OperatorSettings) -> Backend:
    job = parse_job(job_document(body), "spec")
    executor = job.spec.executor or settings.default_executor
    if executor not in settings.executors:
        allowed = ", ".join(e.value for e in settings.executors)
        raise SpecError("spec.executor", f"{executor.value!r} is not enabled in this operator (enabled: {allowed}; "
                                         f"KRUNCH_EXECUTORS, Helm value operator.executors)")  # fmt: skip
    if executor is Executor.RAY_JOB:
        from krunch.operator.kuberay import KubeRayBackend

        return KubeRayBackend(settings, body["metadata"]["namespace"], body)
    from krunch.operator.ray_jobs import RayJobsBackend

    address = job.spec.ray_address or settings.ray_address
    if not address:
        raise SpecError("spec.rayAddress", "no Ray cluster: set spec.rayAddress or the operator's RAY_ADDRESS")
    return RayJobsBackend(address, settings.mlflow_tracking_uri)


async def start_when_free(body: dict[str, Any], status: dict[str, Any], patch: kopf.Patch, retry: int,
                          entries: list[Entry], scheduler: Scheduler, logger: logging.Logger) -> None:  # fmt: skip
    meta = body["metadata"]
    key: Key = (meta["namespace"], meta["name"])
    settings = scheduler.settings
    attempt = int(status.get("attempt") or 0)
    sid = submission_id(meta["uid"], attempt)
    backend = backend_for(body, settings)
    async with scheduler.lock:
        if meta["uid"] not in scheduler.orphans_checked:  # submitted just before a crash, status never written
            scheduler.orphans_checked.add(meta["uid"])
            try:
                adopted = (await asyncio.to_thread(backend.state, sid)).phase is not RunPhase.MISSING
            except BackendUnavailable:
                adopted = False
            if adopted:
                scheduler.claimed.add(key)
                record(body, patch, status, Phase.RUNNING, Reason.SUBMITTED, f"adopted Ray job {sid} submitted earlier",
                       rayJobId=sid, attempt=attempt, executor=backend.executor.value)  # fmt: skip
                return
        if not may_start(key, entries, scheduler.claimed, settings.max_concurrent_jobs):
            place = queue_position(key, entries)
            message = f"waiting for a free slot ({place} in queue, {settings.max_concurrent_jobs} running at most)"
            if place and status.get("message") != message:
                patch.status["message"] = message
            return
        scheduler.claimed.add(key)
    try:
        await asyncio.to_thread(backend.submit, sid, job_document(body), body)
    except BackendUnavailable as err:
        scheduler.claimed.discard(key)
        metrics.SUBMISSION_ERRORS.inc()
        attempts = retry + 1
        if retry >= settings.submit_retries:
            record(body, patch, status, Phase.FAILED, Reason.SUBMISSION_FAILED, f"gave up after {attempts} attempts: {err}")
            return
        message = f"submission attempt {attempts} of {settings.submit_retries + 1} failed: {err}"
        patch.status.update({"reason": Reason.SUBMISSION_RETRYING.value, "message": message})
        kopf.event(body, type="Warning", reason=Reason.SUBMISSION_RETRYING.value, message=message[:1024])
        raise kopf.TemporaryError(message, delay=settings.retry_delay_seconds) from None
    metrics.SUBMISSIONS.labels(backend.executor.value).inc()
    logger.info(f"submitted {sid} ({backend.executor.value})")
    record(body, patch, status, Phase.RUNNING, Reason.SUBMITTED, f"submitted to Ray as {sid}",
           rayJobId=sid, attempt=attempt, executor=backend.executor.value)  # fmt: skip


def _elapsed_s(status: dict[str, Any]) -> float:
    started = parse_time(status.get("startTime"))
    return (dt.datetime.now(dt.UTC) - started).total_seconds() if started else 0.0


async def poll(body: dict[str, Any], spec: dict[str, Any], status: dict[str, Any], patch: kopf.Patch,
               scheduler: Scheduler, logger: logging.Logger) -> None:  # fmt: skip
    """Read the running job's state: progress into status; terminal states into the phase."""
    backend = backend_for(body, scheduler.settings)
    sid = status["rayJobId"]
    try:
        state = await asyncio.to_thread(backend.state, sid)
    except BackendUnavailable as err:
        patch.status["message"] = f"cannot read the Ray job's state: {err}"
        raise kopf.TemporaryError(str(err), delay=scheduler.settings.poll_seconds) from None
    progress = state.events.progress
    if progress and progress != status.get("progress"):
        patch.status["progress"] = progress
    deadline = spec.get("activeDeadlineSeconds")
    if deadline and not state.phase.terminal and _elapsed_s(status) > deadline:
        await asyncio.to_thread(backend.stop, sid)
        record(body, patch, status, Phase.FAILED, Reason.DEADLINE_EXCEEDED,
               f"ran longer than activeDeadlineSeconds={deadline}; Ray job {sid} stopped")  # fmt: skip
        return
    if state.phase is RunPhase.SUCCEEDED:
        finish(body, patch, status, state)
    elif state.phase is RunPhase.FAILED:
        await retry_or_fail(body, spec, status, patch, state, backend, logger)
    elif state.phase is RunPhase.STOPPED:
        record(body, patch, status, Phase.FAILED, Reason.JOB_STOPPED, f"Ray job {sid} was stopped outside the operator")
    elif state.phase is RunPhase.MISSING:
        record(body, patch, status, Phase.FAILED, Reason.JOB_LOST, f"Ray no longer knows job {sid}: {state.message}")


def finish(body: dict[str, Any], patch: kopf.Patch, status: dict[str, Any], state: RunState) -> None:
    result = state.events.result
    if result is None:
        record(body, patch, status, Phase.FAILED, Reason.JOB_FAILED, "the Ray job succeeded without reporting a result")
        return
    fields = {key: result[key] for key in ("mlflowRunId", "modelVersion", "compressionRatio", "qualityMetric",
                                           "qualityBefore", "qualityAfter") if result.get(key) is not None}  # fmt: skip
    if result.get("modelVersion"):
        registry = (body.get("spec") or {}).get("registry") or {}
        fields["modelUri"] = f"models:/{registry.get('name')}/{result['modelVersion']}"
    done = f"{state.events.done}/{state.events.total} layers" if state.events.total else status.get("progress")
    message = f"registered as {fields['modelUri']}" if "modelUri" in fields else "compressed and tracked"
    record(body, patch, status, Phase.SUCCEEDED, Reason.COMPLETED, message, **fields, **({"progress": done} if done else {}))


async def retry_or_fail(body: dict[str, Any], spec: dict[str, Any], status: dict[str, Any], patch: kopf.Patch,
                        state: RunState, backend: Backend, logger: logging.Logger) -> None:  # fmt: skip
    attempt = int(status.get("attempt") or 0)
    limit = int(spec.get("backoffLimit") or 0)
    failure = state.failure_message()
    if attempt >= limit:
        record(body, patch, status, Phase.FAILED, Reason.JOB_FAILED, failure)
        return
    sid = submission_id(body["metadata"]["uid"], attempt + 1)
    try:
        await asyncio.to_thread(backend.submit, sid, job_document(body), body)
    except BackendUnavailable as err:
        raise kopf.TemporaryError(f"resubmitting {sid}: {err}", delay=5) from None
    metrics.SUBMISSIONS.labels(backend.executor.value).inc()
    logger.info(f"attempt {attempt + 1} of {limit + 1}: resubmitted as {sid}")
    record(body, patch, status, Phase.RUNNING, Reason.RETRYING, f"attempt {attempt} failed ({failure}); resubmitted as {sid}",
           rayJobId=sid, attempt=attempt + 1, progress=None)  # fmt: skip


async def cancel(body: dict[str, Any], status: dict[str, Any], patch: kopf.Patch, scheduler: Scheduler) -> None:
    """The resource is being deleted: stop its Ray job and wait until Ray says it stopped."""
    meta = body["metadata"]
    scheduler.claimed.discard((meta["namespace"], meta["name"]))
    if phase_of(status) is not Phase.RUNNING or not status.get("rayJobId"):
        return  # queued, finished or never admitted: nothing runs
    backend = backend_for(body, scheduler.settings)
    sid = status["rayJobId"]
    try:
        await asyncio.to_thread(backend.stop, sid)
        state = await asyncio.to_thread(backend.state, sid)
    except BackendUnavailable as err:
        raise kopf.TemporaryError(f"stopping {sid}: {err}", delay=2) from None
    if not state.phase.terminal:
        raise kopf.TemporaryError(f"waiting for Ray job {sid} to stop ({state.phase.value})", delay=1)
    record(body, patch, status, Phase.CANCELLED, Reason.CANCELLED, f"deleted; Ray job {sid} {state.phase.value.lower()}")
