"""The Dockerfiles cannot be built here (no Docker engine): hold them to what can be checked without one.
Their pins equal constraints.txt's and setup.sh's, the operator image carries everything the operator imports,
and the images, entry points and users agree with the chart."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import yaml

from tests.helm.chart import CHART, ROOT

DOCKERFILES = {"operator": ROOT / "helm" / "Dockerfile.operator", "ray": ROOT / "helm" / "Dockerfile.ray"}
PIN = re.compile(r"([A-Za-z0-9_.-]+)(?:\[[a-z,]+\])?==([0-9][A-Za-z0-9.]*)")


def pins(text: str) -> dict[str, str]:
    return {name.lower().replace("_", "-"): version for name, version in PIN.findall(text)}


def project_pins() -> dict[str, str]:
    return pins((ROOT / "constraints.txt").read_text()) | pins((ROOT / "scripts" / "setup.sh").read_text())


@pytest.mark.parametrize("image", DOCKERFILES)
def test_dockerfile_pins_match_the_project(image):
    declared = project_pins()
    used = pins(DOCKERFILES[image].read_text())
    assert used, "no pinned packages found"
    assert {name: version for name, version in used.items() if declared.get(name) != version} == {}


def test_the_operator_image_has_every_package_the_operator_imports():
    """Import the operator in a fresh interpreter and list the third-party top-level modules it loaded."""
    code = ("import sys, krunch.operator.handlers, krunch.operator.ray_jobs, krunch.operator.kuberay, krunch.operator.__main__; "
            "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))")  # fmt: skip
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                                timeout=120).stdout.split())  # fmt: skip
    heavy = loaded & {"torch", "transformers", "mlflow", "tensorly", "safetensors"}
    assert not heavy, f"the operator imports {heavy}: its image would need the whole ML stack"
    installed = set(pins(DOCKERFILES["operator"].read_text()))
    distribution_of = {"yaml": "pyyaml", "prometheus_client": "prometheus-client"}
    for module in ("kopf", "kubernetes", "pydantic", "yaml", "prometheus_client", "ray"):
        assert module in loaded and distribution_of.get(module, module) in installed, module


def test_images_and_entry_points_agree_with_the_chart():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    operator = DOCKERFILES["operator"].read_text()
    ray = DOCKERFILES["ray"].read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", operator, re.M).group(1))
    assert entry[:2] == ["python", "-m"] and importlib.util.find_spec(f"{entry[2]}.__main__") is not None, entry
    assert "USER 10001:10001" in operator  # chart: runAsUser 10001
    assert f"rayproject/ray:{values['rayCluster']['rayVersion']}-" in ray
    assert f"ray=={values['rayCluster']['rayVersion']}" in (ROOT / "constraints.txt").read_text()
    assert values["operator"]["rayImage"].endswith(f":{chart['appVersion']}") and values["rayCluster"]["image"] == values["operator"]["rayImage"]
