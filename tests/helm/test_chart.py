"""The Helm chart, rendered by the real Helm engine: lint, Kubernetes schemas, values schema, and what the
operator needs from it (entry point, settings, probes, security, optional MLflow and Ray wired in)."""

from __future__ import annotations

import re
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from krunch.operator.crd import CRD_PATH
from tests.helm.chart import ALL_ON, CHART, NAMESPACE, merged, notes, of_kind, render

KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the chart's kubeVersion admits that kubernetes-validate knows
CONFIGURATIONS = {"defaults": {}, "all-on": ALL_ON}


@pytest.mark.parametrize("values", CONFIGURATIONS.values(), ids=CONFIGURATIONS.keys())
def test_lint_is_clean(values):
    report = helm_python.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2 and "icon is recommended" not in m["error"]]
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("values", CONFIGURATIONS.values(), ids=CONFIGURATIONS.keys())
def test_every_rendered_manifest_passes_the_kubernetes_schemas(values):
    manifests = render(values)
    for manifest in manifests:
        if manifest["apiVersion"] == "ray.io/v1":  # KubeRay's kind: its pod templates are checked as Kubernetes PodTemplates
            spec = manifest["spec"]
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": group["template"]}
                kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
            continue
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    kubernetes_validate.validate(yaml.safe_load(CRD_PATH.read_text()), KUBERNETES_VERSION, strict=True)


def test_the_chart_ships_the_crd_the_operator_is_tested_with():
    assert CRD_PATH.parent == CHART / "crds"
    with helm_python.Chart.load(str(CHART)) as chart:
        [crd] = chart.crds
    assert crd["data"] == CRD_PATH.read_text()


def test_defaults_install_the_operator_with_least_privilege_and_probes():
    manifests = render()
    assert sorted(m["kind"] for m in manifests) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    [deployment] = of_kind(manifests, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["python", "-m", "operators"]
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False and container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    assert ports["health"] == int(env["KRUNCH_HEALTH_PORT"]) and ports["metrics"] == int(env["KRUNCH_METRICS_PORT"])
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert env["KRUNCH_NAMESPACES"] == "" and env["KRUNCH_EXECUTORS"] == "rayCluster"
    [service] = of_kind(manifests, "Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_every_setting_the_chart_passes_is_one_the_operator_reads():
    settings_source = (Path(__file__).resolve().parents[2] / "operators" / "settings.py").read_text()
    read = set(re.findall(r'"((?:KRUNCH|RAY|MLFLOW)_[A-Z_]+)"', settings_source))
    [operator] = [m for m in of_kind(render(ALL_ON), "Deployment") if m["metadata"]["name"].endswith("-operator")]
    passed = {e["name"] for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]} - {"HOME", "TZ"}
    assert passed <= read, passed - read
    assert read - passed <= {"KRUNCH_METRICS_HOST", "KRUNCH_HEALTH_HOST"}, read - passed  # listen on every interface


def test_optional_parts_are_wired_to_the_operator():
    manifests = render(ALL_ON)
    operator = next(m for m in of_kind(manifests, "Deployment") if m["metadata"]["name"].endswith("-operator"))
    container = operator["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mlflow_service = next(m for m in of_kind(manifests, "Service") if m["metadata"]["name"].endswith("-mlflow"))
    port = mlflow_service["spec"]["ports"][0]["port"]
    assert env["MLFLOW_TRACKING_URI"] == f"http://{mlflow_service['metadata']['name']}.{NAMESPACE}.svc:{port}"
    [ray] = of_kind(manifests, "RayCluster")
    assert env["RAY_ADDRESS"] == f"http://{ray['metadata']['name']}-head-svc.{NAMESPACE}.svc:8265"  # KubeRay's head Service
    assert container["envFrom"] == [{"secretRef": {"name": "mlflow-credentials"}}]
    assert env["KRUNCH_MLFLOW_CREDENTIALS_SECRET"] == "mlflow-credentials" and env["KRUNCH_NAMESPACES"] == "team-a,team-b"
    [worker] = ray["spec"]["workerGroupSpecs"]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    mlflow = next(m for m in of_kind(manifests, "Deployment") if m["metadata"]["name"].endswith("-mlflow"))
    args = " ".join(mlflow["spec"]["template"]["spec"]["containers"][0]["command"])
    assert f"{mlflow_service['metadata']['name']}.{NAMESPACE}.svc:{port}" in args and "mlflow.example.com" in args  # allowed Host headers
    [pvc] = of_kind(manifests, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert {m["metadata"]["namespace"] for m in of_kind(manifests, "Role")} == {"team-a", "team-b"}
    assert not of_kind(manifests, "ClusterRole")


def test_explicit_addresses_win_over_the_in_chart_services():
    values = merged(ALL_ON, {"operator": {"rayAddress": "https://ray.example:8265"}, "mlflow": {"trackingUri": "https://mlflow.example"}})
    [operator] = [m for m in of_kind(render(values), "Deployment") if m["metadata"]["name"].endswith("-operator")]
    env = {e["name"]: e.get("value") for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["RAY_ADDRESS"], env["MLFLOW_TRACKING_URI"]) == ("https://ray.example:8265", "https://mlflow.example")


@pytest.mark.parametrize(("values", "message"), [
    ({"operator": {"maxConcurrentJobs": 0}}, "maxConcurrentJobs"),
    ({"operator": {"executors": ["slurm"]}}, "executors"),
    ({"operator": {"rayAddress": "ray-head:6379"}}, "rayAddress"),
    ({"operator": {"watchNamespaces": ["Team_A"]}}, "watchNamespaces"),
    ({"operator": {"logLevel": "TRACE"}}, "logLevel"),
    ({"mlflow": {"server": {"persistence": {"size": "lots"}}}}, "size"),
    ({"operater": {}}, "operater"),
])  # fmt: skip
def test_values_schema_rejects_bad_values_naming_them(values, message):
    with helm_python.Chart.load(str(CHART)) as chart, pytest.raises(helm_python.HelmValuesError, match=message):
        chart.validate_schema(values)


def test_default_executor_outside_the_enabled_ones_fails_the_install():
    with pytest.raises(helm_python.HelmError, match="operator.defaultExecutor"):
        render({"operator": {"defaultExecutor": "rayJob"}})


def test_every_value_is_documented():
    """Every key in values.yaml has a comment line right above it (the requests/limits inside a documented
    `resources` block are Kubernetes' own)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = [line.strip() for index, line in enumerate(lines)
                    if re.match(r"^\s*[A-Za-z][A-Za-z0-9]*:", line) and not lines[index - 1].strip().startswith("#")
                    and not (line.strip().startswith(("requests:", "limits:")) and "resources:" in lines[index - 1] + lines[index - 2])]  # fmt: skip
    assert not undocumented, undocumented


def test_notes_tell_how_to_submit_watch_and_load():
    text = notes(ALL_ON)
    assert "kubectl apply -f examples/minilm-int8.yaml" in text and "kubectl get compressionjobs" in text
    assert 'mlflow.pytorch.load_model("models:/minilm-int8@candidate")' in text and "port-forward svc/krunch-mlflow" in text
