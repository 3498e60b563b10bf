"""Render the chart with the real Helm engine (helm-python-sdk binds Helm v4; no helm binary is needed)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import helm_python
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "krunch"
RELEASE, NAMESPACE = "krunch", "krunch"

# Every optional part on: in-chart MLflow with a credentials Secret, a KubeRay RayCluster, both executors,
# two watched namespaces (Roles instead of a ClusterRole).
ALL_ON: dict[str, Any] = {
    "operator": {"executors": ["rayCluster", "rayJob"], "defaultExecutor": "rayJob", "watchNamespaces": ["team-a", "team-b"],
                 "extraEnv": [{"name": "TZ", "value": "UTC"}], "nodeSelector": {"kubernetes.io/os": "linux"}},
    "mlflow": {"credentialsSecret": "mlflow-credentials", "server": {"enabled": True, "extraAllowedHosts": ["mlflow.example.com"]}},
    "rayCluster": {"enabled": True},
    "metrics": {"serviceAnnotations": {"prometheus.io/scrape": "true"}},
    "imagePullSecrets": [{"name": "regcred"}],
}  # fmt: skip


def merged(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of value layers, later ones winning (what several -f files do)."""
    result: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merged(result[key], value)
            else:
                result[key] = copy.deepcopy(value)
    return result


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`helm template`: every manifest the templates produce, in template order (NOTES.txt left out)."""
    with helm_python.Chart.load(str(CHART)) as chart:
        files = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for path, text in sorted(files.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]  # fmt: skip


def notes(values: dict[str, Any] | None = None) -> str:
    with helm_python.Chart.load(str(CHART)) as chart:
        files = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def rule_set(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every combination a list of RBAC rules grants."""
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}  # fmt: skip
