"""Registration that a rerun completes, and an embedded store that concurrent jobs neither break nor
register twice in."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from krunch.cli import main
from krunch.registry.tracking import STATE_TAG, list_versions
from tests.pipeline.tracking.test_mlflow import ocr_job

KRUNCH = Path(sys.executable).with_name("krunch")
pytestmark = pytest.mark.slow


def test_a_version_left_pending_is_completed_by_the_rerun(mlflow_server, ray_cluster, tmp_path, monkeypatch, capsys):
    """The state a server lost between the version and the alias leaves (version READY and pending, alias on
    the old version, run RUNNING), made through the real server's API; the rerun must finish it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    name = f"pending-{uuid.uuid4().hex[:6]}"
    old = ocr_job(tmp_path / "old.yaml", "ocr-old", "zoo:easyocr-g2", "FeatureExtraction.ConvNet.8", "candidate")
    new = ocr_job(tmp_path / "new.yaml", "ocr-new", "zoo:easyocr-g2", "FeatureExtraction.ConvNet.11", "candidate")
    for path in (old, new):
        document = yaml.safe_load(path.read_text())
        document["spec"]["registry"]["name"] = name
        path.write_text(yaml.safe_dump(document))
    assert main(["compress", str(old), "--out", str(tmp_path / "old")]) == 0
    assert main(["compress", str(new), "--out", str(tmp_path / "new")]) == 0
    version = client.get_model_version_by_alias(name, "candidate")
    assert version.version == "2" and version.tags[STATE_TAG] == "complete"

    client.set_model_version_tag(name, "2", STATE_TAG, "pending")
    client.set_registered_model_alias(name, "candidate", "1")
    client.update_run(version.run_id, status="RUNNING")
    assert {row["version"]: row["state"] for row in list_versions(name)} == {"2": "pending", "1": "complete"}

    capsys.readouterr()
    assert main(["compress", str(new), "--out", str(tmp_path / "new")]) == 0
    assert "completed the pending registration of" in capsys.readouterr().out
    assert client.get_model_version_by_alias(name, "candidate").version == "2"
    assert client.get_run(version.run_id).info.status == "FINISHED"
    assert client.get_model_version(name, "2").tags[STATE_TAG] == "complete"
    assert len(client.search_model_versions(f"name='{name}'")) == 2
    capsys.readouterr()
    assert main(["compress", str(new), "--out", str(tmp_path / "new")]) == 0  # and now there is nothing to do
    assert "already registered as" in capsys.readouterr().out


def test_four_concurrent_jobs_on_a_fresh_sqlite_store_make_one_version(ray_cluster, tmp_path):
    job = ocr_job(tmp_path / "job.yaml", "ocr-race", "zoo:easyocr-g2", "FeatureExtraction.ConvNet.11", "candidate")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"RAY_ADDRESS": ray_cluster}
    processes = [subprocess.Popen([str(KRUNCH), "compress", str(job), "--out", f"out-{i}"], cwd=tmp_path, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]  # fmt: skip
    outputs = [process.communicate(timeout=900) for process in processes]
    assert [p.returncode for p in processes] == [0, 0, 0, 0], [err[-500:] for _, err in outputs]
    assert sum("nothing to do" in out for out, _ in outputs) == 3
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    name = yaml.safe_load(job.read_text())["spec"]["registry"]["name"]
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    runs = client.search_runs([client.get_experiment_by_name("krunch").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    listed = subprocess.run([str(KRUNCH), "models", "list", name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "complete" in listed.stdout, listed.stderr
