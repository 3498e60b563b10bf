"""Fixtures for the operator's end-to-end tests: Kubernetes API (KMock or a real cluster), real Ray, real MLflow."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.operators.cluster import KubeAPI, OperatorProcess, kube_api

CLEANUP_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPI]:
    with kube_api(tmp_path_factory.mktemp("kube")) as api:
        yield api


@pytest.fixture
def start_operator(kube: KubeAPI, ray_jobs_api: str, mlflow_server: str, tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    """Start the operator on a fresh namespace: `start_operator(KRUNCH_MAX_CONCURRENT_JOBS="1", ...)`.
    Afterwards every job in the namespace is deleted (stopping its Ray job) before the operator stops."""
    started: list[OperatorProcess] = []

    def start(namespace: str | None = None, run: bool = True, **settings: str) -> OperatorProcess:
        operator = OperatorProcess(kube, namespace or kube.create_namespace(), tmp_path, {
            "RAY_ADDRESS": ray_jobs_api, "MLFLOW_TRACKING_URI": mlflow_server, "KRUNCH_POLL_SECONDS": "1",
            "KRUNCH_MAX_CONCURRENT_JOBS": "2", **settings})  # fmt: skip
        started.append(operator)
        if run:
            operator.start()
        return operator

    yield start
    for operator in started:
        try:
            if operator.process and operator.process.poll() is None:
                kube.kubectl("delete", "compressionjobs", "--all", "-n", operator.namespace, "--wait=true",
                             f"--timeout={CLEANUP_TIMEOUT_S}s", timeout=CLEANUP_TIMEOUT_S + 10, check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            pass
        finally:
            operator.stop()
