"""The kopf operator for CompressionJobs: decorators and start-up settings only; each step is in
`krunch.operator.reconcile`.

    python -m krunch.operator      # or: kopf run --standalone -m krunch.operator.handlers --all-namespaces --liveness=http://0.0.0.0:8080/healthz

Settings come from the environment (krunch.operator.settings). Run one replica: the
concurrency limit is kept by this process (`--standalone`, no peering).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from krunch.operator import metrics, reconcile
from krunch.operator.crd import GROUP, PLURAL, VERSION
from krunch.operator.lifecycle import Phase, Reason, phase_of
from krunch.operator.scheduling import Entry
from krunch.operator.settings import OperatorSettings
from krunch.spec import SpecError

SETTINGS = OperatorSettings.from_env()  # fails at start-up, naming the variable, on a bad value
# Ray's JobSubmissionClient replaces the address it is given with $RAY_ADDRESS (or $RAY_API_SERVER_ADDRESS)
# whenever that is set, which would send every job to the default cluster and ignore spec.rayAddress.
# The settings hold the value now; the variables must go.
for _variable in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
    os.environ.pop(_variable, None)
SCHEDULER = reconcile.Scheduler(SETTINGS)
RESOURCE = (GROUP, VERSION, PLURAL)
ANNOTATION_PREFIX = "krunch.dev"


def _active(status: dict[str, Any], meta: dict[str, Any], **_: Any) -> bool:
    return phase_of(status) in (Phase.QUEUED, Phase.RUNNING) and not meta.get("deletionTimestamp")


def _entries(jobs: kopf.Index) -> list[Entry]:
    return [entry for store in jobs.values() for entry in store]


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, jobs: kopf.Index, logger: logging.Logger, **_: Any) -> None:
    settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=ANNOTATION_PREFIX)
    settings.posting.level = logging.WARNING  # Events come from the lifecycle, not from kopf's log lines
    settings.watching.server_timeout = 300
    # Least privilege: no cluster-wide watching of CRDs and namespaces. The chart installs the CRD before the
    # operator starts, and KRUNCH_NAMESPACES are exact names; the RBAC test holds the chart to these calls.
    settings.scanning.disabled = True
    if SETTINGS.metrics_port:
        metrics.serve(SETTINGS.metrics_port, SETTINGS.metrics_host, lambda: _entries(jobs))
    logger.info(f"krunch operator: {SETTINGS}")
    _load_kubernetes_client(logger)


def _load_kubernetes_client(logger: logging.Logger) -> None:
    """The `kubernetes` client creates KubeRay RayJobs (executor rayJob): in-cluster credentials, else the
    kubeconfig. Without either, rayCluster jobs still run and rayJob jobs fail with the reason."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as err:
            logger.warning(f"no Kubernetes credentials for the rayJob executor: {err}")


@kopf.index(*RESOURCE)
def jobs(namespace: str, name: str, status: dict[str, Any], spec: dict[str, Any], meta: dict[str, Any],
         **_: Any) -> dict[tuple[str, str], Entry]:  # fmt: skip
    """Every job's phase, priority and age: the scheduler's view of the queue."""
    phase = phase_of(status)
    if phase is not Phase.QUEUED:
        SCHEDULER.claimed.discard((namespace, name))  # its Running (or final) status is visible now
    return {(namespace, name): Entry((namespace, name), phase, int(spec.get("priority") or 0), meta.get("creationTimestamp") or "")}


@kopf.on.create(*RESOURCE)
def admit(body: kopf.Body, status: dict[str, Any], patch: kopf.Patch, **_: Any) -> None:
    reconcile.admit(body, status, patch, SETTINGS)


@kopf.timer(*RESOURCE, interval=SETTINGS.poll_seconds, when=_active)
async def drive(body: kopf.Body, spec: dict[str, Any], status: dict[str, Any], patch: kopf.Patch, retry: int,
                jobs: kopf.Index, logger: logging.Logger, **_: Any) -> None:  # fmt: skip
    """Queued: start when a slot is free. Running: progress, deadline, result."""
    try:
        if phase_of(status) is Phase.QUEUED:
            await reconcile.start_when_free(body, status, patch, retry, _entries(jobs), SCHEDULER, logger)
        elif phase_of(status) is Phase.RUNNING:
            await reconcile.poll(body, spec, status, patch, SCHEDULER, logger)
    except SpecError as err:  # e.g. the operator lost its RAY_ADDRESS after the job was admitted
        reconcile.record(body, patch, status, Phase.FAILED, Reason.INVALID_SPEC, str(err))


@kopf.on.delete(*RESOURCE, retries=120)
async def cancel(body: kopf.Body, status: dict[str, Any], patch: kopf.Patch, **_: Any) -> None:
    await reconcile.cancel(body, status, patch, SCHEDULER)


@kopf.on.probe(id="queued")
def queued(jobs: kopf.Index, **_: Any) -> int:
    return sum(1 for entry in _entries(jobs) if entry.phase is Phase.QUEUED)
