"""Pure parts of the operator: queue order, settings, lifecycle, job events, the KubeRay manifest."""

from __future__ import annotations

import pytest

from krunch.operator.kuberay import build_rayjob_manifest, map_status, rayjob_name
from krunch.operator.lifecycle import Phase, Reason, transition
from krunch.operator.runs import RunPhase, submission_id
from krunch.operator.scheduling import Entry, may_start, queue_position
from krunch.operator.settings import OperatorSettings, SettingsError
from krunch.job_events import emit, parse_events
from krunch.spec import Executor


def entry(name: str, phase: Phase, priority: int = 0, created: str = "2026-01-01T00:00:00Z") -> Entry:
    return Entry(("ns", name), phase, priority, created)


def test_queue_prefers_priority_then_age_and_respects_the_limit() -> None:
    entries = [entry("old", Phase.QUEUED, 0, "2026-01-01T00:00:01Z"), entry("new", Phase.QUEUED, 0, "2026-01-01T00:00:02Z"),
               entry("urgent", Phase.QUEUED, 5, "2026-01-01T00:00:03Z")]  # fmt: skip
    assert [may_start(("ns", n), entries, set(), 1) for n in ("urgent", "old", "new")] == [True, False, False]
    assert [may_start(("ns", n), entries, set(), 2) for n in ("urgent", "old", "new")] == [True, True, False]
    assert queue_position(("ns", "new"), entries) == 3
    running = [*entries, entry("busy", Phase.RUNNING)]
    assert not may_start(("ns", "urgent"), running, set(), 1)
    # a job just started here holds its slot until its Running status comes back through the watch
    assert not may_start(("ns", "old"), entries, {("ns", "urgent")}, 1)
    assert may_start(("ns", "old"), entries, {("ns", "urgent")}, 2)


def test_a_job_admitted_first_at_start_up_waits_for_higher_priority_jobs_still_pending() -> None:
    # the operator starts with three jobs it has not admitted yet; "low" is admitted (Queued) first
    entries = [entry("low", Phase.QUEUED, 0, "2026-01-01T00:00:01Z"), entry("high", Phase.PENDING, 10, "2026-01-01T00:00:02Z")]
    assert not may_start(("ns", "low"), entries, set(), 1)
    assert queue_position(("ns", "low"), entries) == 2
    # once "high" fails validation it leaves the queue, and "low" starts
    entries[1] = entry("high", Phase.FAILED, 10, "2026-01-01T00:00:02Z")
    assert may_start(("ns", "low"), entries, set(), 1)


@pytest.mark.parametrize(("env", "variable"), [
    ({"RAY_ADDRESS": "127.0.0.1:6379"}, "RAY_ADDRESS"),
    ({"KRUNCH_MAX_CONCURRENT_JOBS": "0"}, "KRUNCH_MAX_CONCURRENT_JOBS"),
    ({"KRUNCH_MAX_CONCURRENT_JOBS": "two"}, "KRUNCH_MAX_CONCURRENT_JOBS"),
    ({"KRUNCH_DEFAULT_EXECUTOR": "slurm"}, "KRUNCH_DEFAULT_EXECUTOR"),
    ({"KRUNCH_POLL_SECONDS": "0"}, "KRUNCH_POLL_SECONDS"),
])  # fmt: skip
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        OperatorSettings.from_env(env)


def test_default_executor_must_be_enabled() -> None:
    with pytest.raises(SettingsError, match="KRUNCH_DEFAULT_EXECUTOR='rayJob' is not in KRUNCH_EXECUTORS"):
        OperatorSettings.from_env({"KRUNCH_EXECUTORS": "rayCluster", "KRUNCH_DEFAULT_EXECUTOR": "rayJob"})
    with pytest.raises(SettingsError, match="KRUNCH_EXECUTORS: 'slurm'"):
        OperatorSettings.from_env({"KRUNCH_EXECUTORS": "rayCluster,slurm"})
    assert OperatorSettings.from_env({"KRUNCH_EXECUTORS": "rayJob", "KRUNCH_DEFAULT_EXECUTOR": "rayJob"}).executors == (Executor.RAY_JOB,)


def test_settings_from_env() -> None:
    settings = OperatorSettings.from_env({"RAY_ADDRESS": "http://ray:8265/", "KRUNCH_NAMESPACES": "a, b", "KRUNCH_MAX_CONCURRENT_JOBS": "3"})
    assert (settings.ray_address, settings.namespaces, settings.max_concurrent_jobs) == ("http://ray:8265", ("a", "b"), 3)


def test_transition_keeps_condition_times_until_their_status_flips() -> None:
    queued = transition(None, Phase.QUEUED, Reason.QUEUED, "waiting")
    running = transition(queued | {"conditions": [c | {"lastTransitionTime": "T0"} for c in queued["conditions"]]},
                         Phase.RUNNING, Reason.SUBMITTED, "submitted")  # fmt: skip
    times = {c["type"]: c["lastTransitionTime"] for c in running["conditions"]}
    assert times["Ready"] == "T0" and times["Failed"] == "T0" and times["Running"] != "T0"
    assert "startTime" in running and "endTime" not in running
    assert "endTime" in transition(running, Phase.FAILED, Reason.JOB_FAILED, "boom")


def test_job_events_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    emit("progress", done=3, total=12)
    emit("progress", done=12, total=12)
    emit("stage", stage="evaluate")
    emit("result", modelVersion="4")
    log = "noise\n" + capsys.readouterr().out + 'krunch-event {"kind": "progress", "do'  # a torn last line
    events = parse_events(log)
    assert (events.progress, events.result["modelVersion"], events.events) == ("12/12 layers, evaluate", "4", 4)


def test_rayjob_manifest_sizes_the_cluster_from_resources() -> None:
    job = {"metadata": {"name": "j", "namespace": "ns", "uid": "u"},
           "spec": {"resources": {"workers": 3, "cpusPerTask": 2, "gpusPerTask": 0.5}}}  # fmt: skip
    sid = submission_id("0c1d2e3f-aaaa-bbbb-cccc-1234567890ab", 1)
    manifest = build_rayjob_manifest(job, sid, OperatorSettings(None, "http://mlflow:5000"))
    assert manifest["metadata"]["name"] == rayjob_name(sid) and len(manifest["metadata"]["name"]) <= 63
    assert manifest["spec"]["jobId"] == sid and manifest["spec"]["entrypoint"] == "python -m krunch.job"
    [group] = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 3
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and limits["cpu"] == "2"
    assert "http://mlflow:5000" in manifest["spec"]["runtimeEnvYAML"]
    assert "envFrom" not in group["template"]["spec"]["containers"][0]
    with_secret = build_rayjob_manifest(job, sid, OperatorSettings(None, "http://mlflow:5000", mlflow_credentials_secret="mlflow-creds"))
    for pod in (with_secret["spec"]["rayClusterSpec"]["headGroupSpec"], with_secret["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]):
        assert pod["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "mlflow-creds"}}]


@pytest.mark.parametrize(("status", "phase"), [
    ({}, RunPhase.PENDING),
    ({"jobDeploymentStatus": "Initializing"}, RunPhase.PENDING),
    ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, RunPhase.RUNNING),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, RunPhase.SUCCEEDED),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}, RunPhase.FAILED),
    ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, RunPhase.FAILED),
    ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, RunPhase.STOPPED),
])  # fmt: skip
def test_kuberay_status_mapping(status: dict, phase: RunPhase) -> None:
    assert map_status(status)[0] is phase
