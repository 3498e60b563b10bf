"""The real operator process (`kopf run`) against a Kubernetes API (KMock here, or KRUNCH_TEST_KUBECONFIG),
a real Ray cluster through the Jobs API, and a real MLflow server: jobs applied with the real `kubectl`."""

from __future__ import annotations

import time
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient
from ray.job_submission import JobSubmissionClient

from krunch.operator.kuberay import rayjob_name
from krunch.operator.runs import submission_id
from tests.operators.cluster import KubeAPI, OperatorProcess

pytestmark = pytest.mark.slow
JOB_TIMEOUT_S = 240


def minilm_job(name: str, namespace: str, registry: str | None = None, layers: str = "encoder.layer.*", **spec: Any) -> dict:
    """A real job: all-MiniLM-L6-v2's linears to int8, evaluated on a small slice, registered in MLflow."""
    return {
        "apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": "zoo:minilm-l6"},
            "recipe": {"rules": [{"match": layers, "method": "none"}], "quantize": {"bits": 8}},
            "evaluation": {"items": 10},
            "registry": {"name": registry or f"{namespace}-{name}", "alias": "candidate"},
            **spec,
        },
    }  # fmt: skip


def phase(obj: dict | None) -> str | None:
    return ((obj or {}).get("status") or {}).get("phase")


def ray_jobs_of(ray_jobs_api: str, uid: str) -> list:
    return [job for job in JobSubmissionClient(ray_jobs_api).list_jobs() if (job.metadata or {}).get("krunch.dev/uid") == uid]


def wait_phase(kube: KubeAPI, operator: OperatorProcess, name: str, phases: set[str], timeout: float = JOB_TIMEOUT_S,
               on_poll=None) -> dict:  # fmt: skip
    try:
        return kube.wait_for(name, operator.namespace, lambda o: phase(o) in phases, timeout, f"in {phases}", on_poll=on_poll)
    except AssertionError as err:
        raise AssertionError(f"{err}\noperator log (tail):\n{operator.log()[-4000:]}") from None


def test_applied_job_runs_on_ray_and_registers_a_version(kube: KubeAPI, start_operator, ray_jobs_api: str, mlflow_server: str) -> None:
    operator = start_operator()
    ns = operator.namespace
    applied = time.time()
    kube.apply(minilm_job("minilm-int8", ns), ns)
    seen_progress: list[str] = []

    def watch(obj: dict | None) -> None:
        progress = ((obj or {}).get("status") or {}).get("progress")
        if progress and phase(obj) == "Running" and progress not in seen_progress:
            seen_progress.append(progress)

    done = wait_phase(kube, operator, "minilm-int8", {"Succeeded", "Failed"}, on_poll=watch)
    status, uid = done["status"], done["metadata"]["uid"]
    assert status["phase"] == "Succeeded", status
    assert status["reason"] == "Completed" and status["progress"] == "36/36 layers"
    assert seen_progress, "status.progress never showed while the job ran"
    assert status["rayJobId"] == f"krunch-{uid}-0"
    assert status["startTime"] <= status["endTime"]
    assert status["compressionRatio"] > 1 and status["qualityMetric"] == "lee50_pearson"
    assert {c["type"]: c["status"] for c in status["conditions"]} == {"Ready": "True", "Running": "False", "Failed": "False"}

    submitted = ray_jobs_of(ray_jobs_api, uid)
    assert [job.submission_id for job in submitted] == [status["rayJobId"]]
    print(f"\napply -> Ray submission: {submitted[0].start_time / 1000 - applied:.2f} s; progress seen: {seen_progress}")

    registry = f"{ns}-minilm-int8"
    version = MlflowClient(mlflow_server, registry_uri=mlflow_server).get_model_version(registry, status["modelVersion"])
    assert version.tags["krunch.job_id"] == f"uid:{uid}"
    assert version.run_id == status["mlflowRunId"]
    assert status["modelUri"] == f"models:/{registry}/{status['modelVersion']}"

    reasons = [event["reason"] for event in kube.events("minilm-int8", ns)]
    assert {"Queued", "Submitted", "Completed"} <= set(reasons), reasons
    metrics = operator.metrics()
    assert 'krunch_submissions_total{executor="rayCluster"} 1.0' in metrics
    assert 'krunch_jobs{phase="Succeeded"} 1.0' in metrics


def test_queue_starts_one_job_at_a_time_by_priority_then_age(kube: KubeAPI, start_operator) -> None:
    operator = start_operator(run=False, KRUNCH_MAX_CONCURRENT_JOBS="1")
    ns = operator.namespace
    names = {"first-low": 0, "high": 10, "last-low": 0}
    for name, priority in names.items():  # applied before the operator starts: it sees all three queued
        kube.apply(minilm_job(name, ns, layers="encoder.layer.0.*", priority=priority), ns)
        time.sleep(1.05)  # distinct creation times: creationTimestamp has one-second resolution
    operator.start()
    most_running, saw_one_running_two_queued = 0, False
    deadline = time.monotonic() + 3 * JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        phases = {name: phase(kube.get(name, ns)) for name in names}
        running = sum(p == "Running" for p in phases.values())
        most_running = max(most_running, running)
        saw_one_running_two_queued |= running == 1 and sum(p == "Queued" for p in phases.values()) == 2
        if all(p in ("Succeeded", "Failed") for p in phases.values()):
            break
        time.sleep(0.5)
    jobs = {name: kube.get(name, ns)["status"] for name in names}
    assert all(s["phase"] == "Succeeded" for s in jobs.values()), {n: (s["phase"], s.get("message")) for n, s in jobs.items()}
    assert most_running == 1 and saw_one_running_two_queued
    order = sorted(names, key=lambda name: jobs[name]["startTime"] + jobs[name]["rayJobId"])
    starts = [jobs[name]["startTime"] for name in order]
    assert order == ["high", "first-low", "last-low"], (order, starts)
    ends = {name: jobs[name]["endTime"] for name in names}
    assert ends["high"] <= jobs["first-low"]["startTime"] and ends["first-low"] <= jobs["last-low"]["startTime"]


def test_deleting_jobs_stops_the_running_one_and_drops_the_queued_one(kube: KubeAPI, start_operator, ray_jobs_api: str) -> None:
    operator = start_operator(KRUNCH_MAX_CONCURRENT_JOBS="1")
    ns = operator.namespace
    kube.apply(minilm_job("running", ns), ns)
    running = wait_phase(kube, operator, "running", {"Running"}, timeout=60)
    kube.apply(minilm_job("queued", ns), ns)
    queued = wait_phase(kube, operator, "queued", {"Queued"}, timeout=30)

    kube.kubectl("delete", "compressionjob", "queued", "-n", ns, "--timeout=30s")
    assert kube.get("queued", ns) is None
    assert ray_jobs_of(ray_jobs_api, queued["metadata"]["uid"]) == []

    kube.kubectl("delete", "compressionjob", "running", "-n", ns, "--timeout=60s", timeout=70)
    assert kube.get("running", ns) is None
    [ray_job] = ray_jobs_of(ray_jobs_api, running["metadata"]["uid"])
    assert ray_job.status.value == "STOPPED", ray_job.status
    assert "Cancelled" in [event["reason"] for event in kube.events("running", ns)]


def test_operator_restarted_mid_job_resumes_it(kube: KubeAPI, start_operator, ray_jobs_api: str, mlflow_server: str) -> None:
    operator = start_operator()
    ns = operator.namespace
    kube.apply(minilm_job("restart", ns), ns)
    running = wait_phase(kube, operator, "restart", {"Running"}, timeout=60)
    operator.kill()  # a crash: no clean-up
    operator.start()
    done = wait_phase(kube, operator, "restart", {"Succeeded", "Failed"})
    assert done["status"]["phase"] == "Succeeded", done["status"]
    uid = running["metadata"]["uid"]
    assert len(ray_jobs_of(ray_jobs_api, uid)) == 1
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    versions = client.search_model_versions(f"name='{ns}-restart'")
    assert [(v.version, v.tags["krunch.job_id"]) for v in versions] == [(done["status"]["modelVersion"], f"uid:{uid}")]


def test_spec_the_pipeline_rejects_fails_without_submission(kube: KubeAPI, start_operator, ray_jobs_api: str) -> None:
    operator = start_operator()
    ns = operator.namespace
    job = minilm_job("invalid", ns)
    job["spec"]["recipe"]["rules"][0]["rank"] = {"fixed": 8}  # the CRD schema allows it; method none does not
    kube.apply(job, ns)
    failed = wait_phase(kube, operator, "invalid", {"Failed"}, timeout=30)
    assert failed["status"]["reason"] == "InvalidSpec"
    assert "spec.recipe.rules[0]" in failed["status"]["message"] and "remove rank" in failed["status"]["message"]
    assert ray_jobs_of(ray_jobs_api, failed["metadata"]["uid"]) == []
    assert "InvalidSpec" in [event["reason"] for event in kube.events("invalid", ns)]


def test_unreachable_ray_is_retried_then_fails_the_submission(kube: KubeAPI, start_operator) -> None:
    operator = start_operator(KRUNCH_SUBMIT_RETRIES="2", KRUNCH_RETRY_DELAY_SECONDS="0.5")
    ns = operator.namespace
    kube.apply(minilm_job("unreachable", ns, rayAddress="http://127.0.0.1:1"), ns)  # port 1: nothing listens there
    failed = wait_phase(kube, operator, "unreachable", {"Failed", "Running", "Succeeded"}, timeout=60)
    assert failed["status"]["reason"] == "SubmissionFailed", failed["status"]
    assert "gave up after 3 attempts" in failed["status"]["message"]
    reasons = [event["reason"] for event in kube.events("unreachable", ns)]
    assert reasons.count("SubmissionRetrying") == 2 and reasons.count("SubmissionFailed") == 1, reasons


def test_deadline_exceeded_fails_the_job_and_stops_ray(kube: KubeAPI, start_operator, ray_jobs_api: str) -> None:
    operator = start_operator()
    ns = operator.namespace
    kube.apply(minilm_job("deadline", ns, activeDeadlineSeconds=3), ns)
    failed = wait_phase(kube, operator, "deadline", {"Failed", "Succeeded"}, timeout=90)
    assert failed["status"]["reason"] == "DeadlineExceeded", failed["status"]
    [ray_job] = ray_jobs_of(ray_jobs_api, failed["metadata"]["uid"])
    deadline = time.monotonic() + 30
    while ray_job.status.value not in ("STOPPED", "SUCCEEDED", "FAILED") and time.monotonic() < deadline:
        time.sleep(0.5)
        [ray_job] = ray_jobs_of(ray_jobs_api, failed["metadata"]["uid"])
    assert ray_job.status.value == "STOPPED"


def test_failed_ray_job_is_resubmitted_up_to_backoff_limit(kube: KubeAPI, start_operator, ray_jobs_api: str) -> None:
    operator = start_operator()
    ns = operator.namespace
    job = minilm_job("backoff", ns, backoffLimit=1)
    job["spec"]["model"]["source"] = "zoo:no-such-model"  # valid as a spec, fails when the job loads it
    kube.apply(job, ns)
    failed = wait_phase(kube, operator, "backoff", {"Failed", "Succeeded"}, timeout=120)
    status = failed["status"]
    assert status["reason"] == "JobFailed" and status["attempt"] == 1, status
    assert "no-such-model" in status["message"]
    uid = failed["metadata"]["uid"]
    assert sorted(job.submission_id for job in ray_jobs_of(ray_jobs_api, uid)) == [f"krunch-{uid}-0", f"krunch-{uid}-1"]
    assert "Retrying" in [event["reason"] for event in kube.events("backoff", ns)]


def wait_ray_job_done(ray_jobs_api: str, sid: str, timeout: float = JOB_TIMEOUT_S) -> str:
    client, deadline = JobSubmissionClient(ray_jobs_api), time.monotonic() + timeout
    while (status := client.get_job_status(sid).value) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(1)
    return status


def test_rayjob_executor_creates_an_owned_rayjob_and_follows_its_status(kube: KubeAPI, start_operator, ray_jobs_api: str,
                                                                         mlflow_server: str) -> None:  # fmt: skip
    """executor: rayJob. On KMock no KubeRay runs, so the test does its part (create the job on the Ray cluster
    from the RayJob's spec, report its state in the RayJob's status) against the real local Ray cluster."""
    if not kube.mock:
        pytest.skip("on a real cluster KubeRay's own controller runs the RayJob; run this test there with KubeRay installed")
    image = "registry.example/krunch-ray:test"
    operator = start_operator(KRUNCH_RAY_IMAGE=image)
    ns = operator.namespace
    kube.apply(minilm_job("on-kuberay", ns, executor="rayJob", resources={"workers": 2}), ns)
    running = wait_phase(kube, operator, "on-kuberay", {"Running", "Failed"}, timeout=60)
    uid = running["metadata"]["uid"]
    sid = submission_id(uid, 0)
    assert (running["status"]["phase"], running["status"]["rayJobId"], running["status"]["executor"]) == ("Running", sid, "rayJob")

    name = rayjob_name(sid)
    rayjob = kube.wait_for(name, ns, lambda o: o is not None, 30, "created", kind="rayjobs")
    [owner] = rayjob["metadata"]["ownerReferences"]  # Kubernetes deletes the RayJob (and its cluster) with the job
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("CompressionJob", "on-kuberay", uid, True)
    spec = rayjob["spec"]
    assert spec["jobId"] == sid and spec["metadata"]["krunch.dev/uid"] == uid
    [workers] = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == 2 and workers["template"]["spec"]["containers"][0]["image"] == image

    # KubeRay's part: submit the entry point with the RayJob's runtime env under its jobId, report Running
    JobSubmissionClient(ray_jobs_api).submit_job(
        entrypoint=spec["entrypoint"], submission_id=spec["jobId"], runtime_env=yaml.safe_load(spec["runtimeEnvYAML"]),
        metadata=spec["metadata"], entrypoint_num_cpus=spec["entrypointNumCpus"])  # fmt: skip
    kube.patch_status("rayjobs", name, ns, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "jobId": sid,
                                            "dashboardURL": ray_jobs_api.removeprefix("http://")})  # fmt: skip
    # progress comes from the job's logs through the dashboard KubeRay reported
    progressed = kube.wait_for("on-kuberay", ns, lambda o: bool(((o or {}).get("status") or {}).get("progress")),
                               JOB_TIMEOUT_S, "showing progress")  # fmt: skip
    assert progressed["status"]["phase"] == "Running"
    assert wait_ray_job_done(ray_jobs_api, sid) == "SUCCEEDED"
    assert phase(kube.get("on-kuberay", ns)) == "Running"  # KubeRay's status, not Ray's, ends the job
    kube.patch_status("rayjobs", name, ns, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})

    status = wait_phase(kube, operator, "on-kuberay", {"Succeeded", "Failed"}, timeout=60)["status"]
    assert status["phase"] == "Succeeded", status
    version = MlflowClient(mlflow_server, registry_uri=mlflow_server).get_model_version(f"{ns}-on-kuberay", status["modelVersion"])
    assert version.tags["krunch.job_id"] == f"uid:{uid}"
