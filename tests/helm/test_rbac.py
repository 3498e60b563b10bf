"""The chart's RBAC grants exactly the API calls the operator makes: recorded, not guessed.

The real operator process runs a session against KMock with request recording
on, through every kind of call it makes: admit a job, create its KubeRay
RayJob (executor rayJob), poll it, cancel it on delete (delete the RayJob,
release the finalizer), and fail an invalid job. The calls with the
operator's user agents (kopf's, and krunch-operator's for the RayJobs) are the
permissions it needs; the chart's Role and ClusterRole must grant those, and
nothing more. No Ray or MLflow is needed: these paths only talk to Kubernetes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from krunch.operator.kuberay import USER_AGENT
from tests.helm.chart import of_kind, render, rule_set
from tests.operators.cluster import KubeAPI, OperatorProcess, kube_api

TIMEOUT_S = 60
RAYJOB_RULES = {("ray.io", "rayjobs", verb) for verb in ("create", "get", "delete")}


def job(name: str, namespace: str, **spec: object) -> dict:
    return {
        "apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": name, "namespace": namespace},
        "spec": {"model": {"source": "zoo:minilm-l6"}, "recipe": {"rules": [{"match": "*", "method": "none"}]}, **spec},
    }  # fmt: skip


def phase(obj: dict | None) -> str | None:
    return ((obj or {}).get("status") or {}).get("phase")


def record_session(kube: KubeAPI, namespace: str, workdir: Path) -> None:
    """Drive the operator through each kind of call it makes."""
    operator = OperatorProcess(kube, namespace, workdir, {"KRUNCH_DEFAULT_EXECUTOR": "rayJob", "KRUNCH_POLL_SECONDS": "0.5",
                                                          "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})  # fmt: skip
    operator.start()
    try:
        kube.apply(job("on-kuberay", namespace), namespace)
        running = kube.wait_for("on-kuberay", namespace, lambda o: phase(o) in ("Running", "Failed"), TIMEOUT_S, "Running")
        assert phase(running) == "Running", running["status"]
        time.sleep(2)  # a few polls of the RayJob
        kube.kubectl("delete", "compressionjob", "on-kuberay", "-n", namespace, "--wait=true", f"--timeout={TIMEOUT_S}s",
                     timeout=TIMEOUT_S + 10)  # fmt: skip
        # rayCluster with no Ray address anywhere: the pipeline-level check fails it, nothing is submitted
        kube.apply(job("nowhere", namespace, executor="rayCluster"), namespace)
        failed = kube.wait_for("nowhere", namespace, lambda o: phase(o) == "Failed", TIMEOUT_S, "Failed")
        assert failed["status"]["reason"] == "InvalidSpec"
    finally:
        operator.stop()


@pytest.fixture(scope="module")
def operator_calls(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict]]:
    workdir = tmp_path_factory.mktemp("rbac")
    record = workdir / "requests.jsonl"
    with kube_api(workdir, record=record) as kube:
        if not kube.mock:
            pytest.skip("the RBAC session needs KMock's request record (a real cluster has its audit log instead)")
        namespace = kube.create_namespace()
        record_session(kube, namespace, workdir)
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    ours = [e for e in entries if e["agent"].startswith(("kopf/", USER_AGENT))]
    assert ours, "the record holds no request from the operator"
    return namespace, ours


def test_the_operator_only_calls_into_the_namespace_it_watches(operator_calls):
    namespace, calls = operator_calls
    assert {call["namespace"] for call in calls} == {namespace}, [c for c in calls if c["namespace"] != namespace]


def test_role_grants_exactly_the_recorded_calls(operator_calls):
    namespace, calls = operator_calls
    used = {(call["group"], call["resource"], call["verb"]) for call in calls}
    assert RAYJOB_RULES <= used and ("krunch.dev", "compressionjobs/status", "patch") in used  # the session covered them

    manifests = render({"operator": {"watchNamespaces": [namespace], "executors": ["rayCluster", "rayJob"]}})
    [role] = of_kind(manifests, "Role")
    assert role["metadata"]["namespace"] == namespace and not of_kind(manifests, "ClusterRole")
    assert rule_set(role["rules"]) == used

    cluster_wide = render({"operator": {"executors": ["rayCluster", "rayJob"]}})
    [cluster_role] = of_kind(cluster_wide, "ClusterRole")
    assert rule_set(cluster_role["rules"]) == used
    [binding] = of_kind(cluster_wide, "ClusterRoleBinding")
    [account] = of_kind(cluster_wide, "ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "krunch"}]


def test_without_the_rayjob_executor_the_role_cannot_touch_rayjobs(operator_calls):
    _, calls = operator_calls
    used = {(call["group"], call["resource"], call["verb"]) for call in calls}
    [cluster_role] = of_kind(render({"operator": {"executors": ["rayCluster"]}}), "ClusterRole")
    assert rule_set(cluster_role["rules"]) == used - RAYJOB_RULES
