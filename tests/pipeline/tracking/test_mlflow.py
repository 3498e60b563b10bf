"""`krunch compress` against a real MLflow server: the run, its artifacts, the version, alias and lineage
tags, idempotent registration, registered versions as sources, and failures that leave nothing behind."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from krunch.cli import main
from krunch.sources import load_model
from krunch.registry.lineage import job_identity, recipe_hash
from krunch.spec import Registry, load_job
from krunch.registry.tracking import configure, register, use_experiment

REGISTERED = f"ocr-small-{uuid.uuid4().hex[:6]}"  # unique per session: KRUNCH_TEST_MLFLOW_URI may be a shared server
UID = str(uuid.uuid4())
HEAL = {"steps": 3, "items": 32, "lr": 1e-4}  # the Tucker factors are int8: the batch norms train


def ocr_job(path: Path, name: str, source: str, match: str, alias: str, uid: str | None = None, heal: dict | None = None) -> Path:
    """EasyOCR: Tucker-2 on one 3x3 conv, int8 on it; 50 words of evaluation keep it quick."""
    metadata = {"name": name} | ({"uid": uid} if uid else {})
    recipe = {"rules": [{"match": match, "method": "tucker", "rank": {"fixed": 64}}], "quantize": {"bits": 8}}
    document = {
        "apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": metadata,
        "spec": {"model": {"source": source}, "recipe": recipe | ({"heal": heal} if heal else {}),
                 "evaluation": {"task": "ocr", "items": 50}, "resources": {"workers": 2},
                 "registry": {"name": REGISTERED, "alias": alias}},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


@pytest.fixture
def server(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    configure()
    return MlflowClient(mlflow_server)


@pytest.fixture(scope="module")
def first(mlflow_server, ray_cluster, tmp_path_factory):
    """One compression run registered on the server; the tests below read what it left there."""
    root = tmp_path_factory.mktemp("tracked")
    job_path = ocr_job(root / "job.yaml", "ocr-tucker", "zoo:easyocr-g2", "FeatureExtraction.ConvNet.11", "candidate", UID,
                       heal=HEAL)  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        assert main(["compress", str(job_path), "--out", str(root / "out")]) == 0
    return job_path, root / "out"


def test_run_has_params_metrics_tables_and_plots(first, server):
    job_path, out = first
    report = yaml.safe_load((out / "report.json").read_text())
    version = server.get_model_version_by_alias(REGISTERED, "candidate")
    run = server.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "ocr-tucker"
    assert run.data.params["recipe.rules.0.method"] == "tucker" and run.data.params["source.source"] == "zoo:easyocr-g2"
    assert run.data.metrics["compression_ratio"] == pytest.approx(report["compression_ratio"])
    assert run.data.metrics["before.word_accuracy"] == report["metrics_before"]["word_accuracy"]
    assert run.data.metrics["after.word_accuracy"] == report["metrics_after"]["word_accuracy"]
    assert run.data.metrics["bytes_after"] == report["bytes_after"] < run.data.metrics["bytes_before"]
    artifacts = {a.path for a in server.list_artifacts(run.info.run_id)} | {a.path for a in server.list_artifacts(run.info.run_id, "plots")}
    assert {"report.json", "layers.json", "layers.csv", "job.yaml", "plots/layers.png", "plots/quality_vs_size.png",
            "plots/heal_loss.png"} <= artifacts  # fmt: skip
    curve = server.get_metric_history(run.info.run_id, "heal.loss")
    assert [m.step for m in curve] == [1, 2, 3] and [m.value for m in curve] == pytest.approx(report["heal"]["losses"])
    assert run.data.metrics["heal.loss_first"] == pytest.approx(report["heal"]["loss_first"]) and report["heal"]["trainable_params"] > 0
    local = Path(server.download_artifacts(run.info.run_id, "layers.csv", str(out.parent)))
    assert "FeatureExtraction.ConvNet.11" in local.read_text() and local.read_text().count("\n") == len(report["layers"]) + 1
    png = Path(server.download_artifacts(run.info.run_id, "plots/quality_vs_size.png", str(out.parent)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_version_has_alias_and_lineage_tags(first, server):
    job_path, out = first
    job = load_job(job_path)
    report = yaml.safe_load((out / "report.json").read_text())
    versions = server.search_model_versions(f"name='{REGISTERED}'")
    assert [v.version for v in versions] == ["1"]
    tags = server.get_model_version_by_alias(REGISTERED, "candidate").tags
    assert tags["krunch.source"] == "zoo:easyocr-g2" and tags["krunch.source_version"] == ""
    assert tags["krunch.recipe_hash"] == recipe_hash(job)
    assert tags["krunch.methods"].startswith("tucker x1") and tags["krunch.methods"].endswith("; int8")
    assert float(tags["krunch.compression_ratio"]) == report["compression_ratio"] > 1
    assert float(tags["krunch.quality_after"]) == report["metrics_after"]["word_accuracy"]
    assert float(tags["krunch.quality_delta"]) <= 0
    assert tags["krunch.k8s_uid"] == UID and tags["krunch.job_id"] == f"uid:{UID}" == job_identity(job)
    assert tags["krunch.krunch_version"]


def test_the_same_job_identity_registers_one_version(first, server, capsys):
    job_path, out = first
    assert main(["compress", str(job_path), "--out", str(out.parent / "again")]) == 0
    assert "already registered" in capsys.readouterr().out
    assert not (out.parent / "again").exists()  # found before any work
    version = server.get_model_version(REGISTERED, "1")
    # the registration step itself is idempotent too (a retried job that got past the check)
    assert register(load_job(job_path), version.source, version.tags) == "1"
    assert len(server.search_model_versions(f"name='{REGISTERED}'")) == 1


def test_a_version_whose_alias_fails_is_removed_again(first, server):
    job = load_job(first[0])
    bad = job.model_copy(update={"spec": job.spec.model_copy(update={"registry": Registry.model_construct(name=REGISTERED, alias="latest")})})
    tags = server.get_model_version(REGISTERED, "1").tags | {"krunch.job_id": "uid:another-job"}
    with pytest.raises(Exception, match="latest"):
        register(bad, server.get_model_version(REGISTERED, "1").source, tags)
    assert [v.version for v in server.search_model_versions(f"name='{REGISTERED}'")] == ["1"]


def test_registered_version_reloads_from_safetensors_and_matches(first, server):
    _, out = first
    registered = load_model(f"models:/{REGISTERED}@candidate")
    local = load_model(f"krunch:{out}")
    assert registered.metadata["registry_version"] == "1"
    assert registered.metadata["pinned_reference"] == f"models:/{REGISTERED}/1"
    state, expected = registered.module.state_dict(), local.module.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_a_registered_version_compresses_further_with_its_version_as_lineage(first, server, tmp_path, capsys):
    job_path = ocr_job(tmp_path / "further.yaml", "ocr-further", f"models:/{REGISTERED}@candidate",
                       "FeatureExtraction.ConvNet.18", "further")  # fmt: skip
    assert main(["compress", str(job_path), "--out", str(tmp_path / "out")]) == 0
    tags = server.get_model_version_by_alias(REGISTERED, "further").tags
    assert tags["krunch.source"] == f"models:/{REGISTERED}@candidate" and tags["krunch.source_version"] == "1"
    manifest = yaml.safe_load((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["source"] == f"models:/{REGISTERED}/1"  # pinned: aliases move
    capsys.readouterr()
    assert main(["models", "list", REGISTERED]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["version", "aliases", "ratio", "metric"]
    further = server.get_model_version_by_alias(REGISTERED, "further").version  # numbers are never reused
    assert lines[1].split()[:2] == [str(further), "further"] and lines[2].split()[:2] == ["1", "candidate"]
    assert f"models:/{REGISTERED}@candidate (v1)" in lines[1]


def test_an_unreachable_server_fails_before_any_work_after_bounded_retries(tmp_path, monkeypatch, capsys):
    from tests.mlflow_server import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    job_path = ocr_job(tmp_path / "job.yaml", "unreachable", "zoo:easyocr-g2", "FeatureExtraction.ConvNet.11", "candidate")
    assert main(["compress", str(job_path), "--out", str(tmp_path / "out")]) == 3  # a connection problem, not bad input
    error = capsys.readouterr().err
    assert f"MLFLOW_TRACKING_URI={uri}" in error and "did not answer after 3 tries" in error
    assert not (tmp_path / "out").exists()


def test_a_registry_name_mlflow_would_refuse_is_rejected_before_any_work(tmp_path, capsys):
    job_path = ocr_job(tmp_path / "job.yaml", "bad-name", "zoo:easyocr-g2", "FeatureExtraction.ConvNet.11", "candidate")
    job_path.write_text(job_path.read_text().replace(REGISTERED, "team/ocr"))
    assert main(["compress", str(job_path), "--out", str(tmp_path / "out")]) == 2
    assert "spec.registry.name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_a_tracking_uri_the_store_is_a_sqlite_file_here_with_artifacts_beside_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert configure() == "sqlite:///mlflow.db"
    use_experiment("sqlite:///mlflow.db")
    experiment = MlflowClient("sqlite:///mlflow.db").get_experiment_by_name("krunch")
    assert (tmp_path / "mlflow.db").is_file()
    assert experiment.artifact_location == (tmp_path / "mlruns").as_uri()


def test_a_server_lost_after_compression_fails_the_job_after_bounded_retries_and_keeps_the_model(ray_cluster, tmp_path_factory, monkeypatch):
    from krunch.run import run_compression
    from krunch.registry.tracking import TrackingError, preflight, track
    from tests.mlflow_server import local_mlflow_server

    root = tmp_path_factory.mktemp("lost-server")
    job = load_job(ocr_job(root / "job.yaml", "lost", "zoo:easyocr-g2", "FeatureExtraction.ConvNet.11", "candidate"))
    with local_mlflow_server(root) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        checked = preflight(job)
        result = run_compression(job, root / "out")
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI="):  # the server is gone; MLflow's retries are bounded
        track(job, result, root / "out", checked)
    assert (root / "out" / "model.safetensors").is_file()  # the work is kept
