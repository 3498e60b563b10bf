"""`krunch compress` picks its Ray cluster: `RAY_ADDRESS` when set, otherwise a local instance it starts and stops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
KRUNCH = Path(sys.executable).with_name("krunch")
JOB = {
    "apiVersion": "krunch.dev/v1alpha1",
    "kind": "CompressionJob",
    "metadata": {"name": "easyocr-small"},
    "spec": {
        "model": {"source": "zoo:easyocr-g2"},
        "recipe": {"rules": [{"match": "FeatureExtraction.ConvNet.1[14]", "method": "tucker", "rank": {"fixed": 32}}]},
        "evaluation": {"task": "ocr", "items": 40},
        "resources": {"workers": 2},
    },
}


def compress(tmp_path: Path, ray_address: str | None) -> tuple[subprocess.CompletedProcess, dict]:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    result = subprocess.run([str(KRUNCH), "compress", str(job), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=400, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((tmp_path / "out" / "report.json").read_text())


def test_compress_connects_to_the_cluster_in_ray_address(tmp_path, ray_cluster):
    result, report = compress(tmp_path, ray_cluster)
    execution = report["execution"]
    assert execution["mode"] == "ray" and execution["address"] == ray_cluster and execution["workers"] == 2
    assert [row["method"] for row in report["layers"]] == ["tucker", "tucker"]
    assert "compressing: 100%" in result.stderr and "2/2" in result.stderr  # the per-layer progress bar


def test_compress_without_ray_address_starts_and_stops_a_local_instance(tmp_path):
    result, report = compress(tmp_path, None)
    assert report["execution"]["address"] == "local" and report["execution"]["nodes"] == 1
    assert report["execution"]["tensors_via_object_store"] == 2  # a .pth source: the driver puts each tensor once
