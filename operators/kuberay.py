"""The `rayJob` executor: a KubeRay RayJob (ray.io/v1) per CompressionJob, with its own ephemeral cluster.

`build_rayjob_manifest` is pure (unit-tested without an API server). The
backend creates the RayJob owned by the CompressionJob (so Kubernetes collects
it with its owner), maps KubeRay's `jobDeploymentStatus`/`jobStatus` onto a
RunState, and once KubeRay reports the cluster's dashboard it reads progress
from the job's logs like the rayCluster executor does.
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

import kopf

from krunch.operator.runs import JOB_ENTRYPOINT, BackendUnavailable, RunPhase, RunState, job_environment, job_metadata
from krunch.operator.settings import OperatorSettings
from krunch.spec import Executor

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
RAY_VERSION = "2.60.0"
HEAD_CPUS, HEAD_MEMORY = "2", "8Gi"
WORKER_MEMORY_PER_CPU = "4Gi"
DEFAULT_WORKERS = 2
USER_AGENT = "krunch-operator/0.1.0"


def rayjob_name(submission_id: str) -> str:
    """A DNS-1123 name within 63 characters (KubeRay derives Service names from it)."""
    name = re.sub(r"[^a-z0-9-]", "-", submission_id.lower())
    return name[:63].strip("-")


def build_rayjob_manifest(job: dict[str, Any], submission_id: str, settings: OperatorSettings) -> dict[str, Any]:
    """RayJob for one attempt: the job's entry point on a cluster sized from `spec.resources`."""
    spec = job["spec"]
    resources = spec.get("resources", {})
    workers = resources.get("workers") or DEFAULT_WORKERS
    cpus = resources.get("cpusPerTask", 1)
    gpus = math.ceil(resources.get("gpusPerTask", 0) or 0)  # a pod gets whole GPUs; Ray shares them by fraction
    worker_limits = {"cpu": str(cpus), "memory": _memory(cpus)} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    image, secret = settings.ray_image, settings.mlflow_credentials_secret
    metadata = job["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {
            "name": rayjob_name(submission_id),
            "namespace": metadata.get("namespace"),
            "labels": {"app.kubernetes.io/managed-by": "krunch-operator", "krunch.dev/job": metadata["name"][:63]},
        },
        "spec": {
            "entrypoint": JOB_ENTRYPOINT,
            "entrypointNumCpus": 0,  # the driver only coordinates; the layers' tasks take the CPUs and GPUs
            "jobId": submission_id,
            "metadata": job_metadata(job),
            "runtimeEnvYAML": json.dumps({"env_vars": job_environment(job, settings.mlflow_tracking_uri)}),  # JSON is YAML
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 300,
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},  # the head only runs the driver
                    "template": {"spec": {"containers": [_container("ray-head", image, {"cpu": HEAD_CPUS, "memory": HEAD_MEMORY}, secret)]}},
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu-workers" if gpus else "cpu-workers",
                    "replicas": workers, "minReplicas": workers, "maxReplicas": workers,
                    "rayStartParams": {},
                    "template": {"spec": {"containers": [_container("ray-worker", image, worker_limits, secret)]}},
                }],
            },
        },
    }  # fmt: skip


def _memory(cpus: float) -> str:
    gib = int(WORKER_MEMORY_PER_CPU.removesuffix("Gi"))
    return f"{max(gib, math.ceil(cpus * gib))}Gi"


def _container(name: str, image: str, limits: dict[str, str], secret: str | None) -> dict[str, Any]:
    """A Ray container; MLflow credentials come from the Secret in the pod, never through the Jobs API."""
    container = {"name": name, "image": image, "resources": {"requests": dict(limits), "limits": dict(limits)}}
    if secret:
        container["envFrom"] = [{"secretRef": {"name": secret}}]
    return container


def map_status(status: dict[str, Any] | None) -> tuple[RunPhase, str]:
    """KubeRay's RayJob status -> (RunPhase, message)."""
    status = status or {}
    deployment = status.get("jobDeploymentStatus") or ""
    job_status = status.get("jobStatus") or ""
    message = " ".join(part for part in (status.get("reason"), status.get("message")) if part)
    if deployment in ("Failed", "ValidationFailed") or job_status == "FAILED":
        return RunPhase.FAILED, message or f"RayJob {deployment or job_status}"
    if job_status == "STOPPED":
        return RunPhase.STOPPED, message or "the Ray job was stopped"
    if deployment == "Complete" and job_status == "SUCCEEDED":
        return RunPhase.SUCCEEDED, message
    if job_status == "RUNNING" or deployment == "Running":
        return RunPhase.RUNNING, message
    return RunPhase.PENDING, message or f"RayJob {deployment or 'New'}"


@functools.cache
def _custom_objects_api():  # noqa: ANN202 - kubernetes.client.CustomObjectsApi
    """One client for the process, made after start-up loaded the credentials."""
    from kubernetes import client

    api_client = client.ApiClient()
    api_client.user_agent = USER_AGENT  # tells the operator's own calls apart in the API server's audit log
    return client.CustomObjectsApi(api_client)


class KubeRayBackend:
    """Creates, reads and deletes RayJobs through the Kubernetes API (the `kubernetes` client)."""

    executor = Executor.RAY_JOB

    def __init__(self, settings: OperatorSettings, namespace: str, owner: dict[str, Any]) -> None:
        self.settings = settings
        self.namespace = namespace
        self.owner = owner

    @staticmethod
    def _api():  # noqa: ANN205 - kubernetes.client.CustomObjectsApi
        return _custom_objects_api()

    def submit(self, submission_id: str, job: dict[str, Any], body: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        manifest = build_rayjob_manifest(job, submission_id, self.settings)
        kopf.adopt(manifest, owner=self.owner)
        try:
            self._api().create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, manifest)
        except ApiException as err:
            if err.status != 409:  # 409: created before a restart; it is ours already
                raise BackendUnavailable(f"creating RayJob {manifest['metadata']['name']}: {err.status} {err.reason}") from None
        except OSError as err:
            raise BackendUnavailable(f"Kubernetes API did not answer: {err}") from None

    def state(self, submission_id: str) -> RunState:
        from kubernetes.client.exceptions import ApiException

        try:
            rayjob = self._api().get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, rayjob_name(submission_id))
        except ApiException as err:
            if err.status == 404:
                return RunState(RunPhase.MISSING, f"RayJob {rayjob_name(submission_id)} is gone")
            raise BackendUnavailable(f"reading RayJob: {err.status} {err.reason}") from None
        status = rayjob.get("status") or {}
        phase, message = map_status(status)
        state = RunState(phase, message)
        dashboard, job_id = status.get("dashboardURL"), status.get("jobId")
        if dashboard and job_id:  # the cluster is up: its Jobs API has the logs with our events
            from krunch.operator.ray_jobs import RayJobsBackend

            url = dashboard if dashboard.startswith("http") else f"http://{dashboard}"
            try:
                state.events = RayJobsBackend(url, None).state(job_id).events
            except BackendUnavailable:
                pass  # progress is best effort here; KubeRay's status is the authority
        return state

    def stop(self, submission_id: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._api().delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, rayjob_name(submission_id))
        except ApiException as err:
            if err.status != 404:
                raise BackendUnavailable(f"deleting RayJob: {err.status} {err.reason}") from None
