"""`krunch compress` end to end on the real models, with the example job files users start from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from krunch.artifact import load_compressed
from krunch.run import run_compression
from krunch.evaluation import EvalOptions, Task, evaluate
from krunch.data.similarity import lee_documents
from krunch.evaluation.embedding import encode
from krunch.spec import load_job, parse_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]  # layer tasks run on a real Ray cluster
EXAMPLES = Path(__file__).parents[2] / "examples"
REPORT_KEYS = {"execution", "params_before", "params_after", "bytes_before", "bytes_after", "metrics_before", "metrics_after", "timings", "layers"}
LAYER_KEYS = {"name", "method", "rank", "params_before", "params_after", "rel_error", "seconds"}


def example(name: str, **spec_changes) -> object:
    job = load_job(EXAMPLES / f"{name}.yaml")
    if not spec_changes:
        return job
    document = job.model_dump(by_alias=True, mode="json", exclude_none=True)
    for path, value in spec_changes.items():
        target = document["spec"]
        *parents, leaf = path.split("__")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return parse_job(document)


def check_report_shape(report: dict, out: Path) -> None:
    assert REPORT_KEYS <= report.keys()
    assert {"plan_s", "decompose_s", "evaluate_s", "total_s"} <= report["timings"].keys()
    assert all(LAYER_KEYS <= row.keys() for row in report["layers"])
    assert json.loads((out / "report.json").read_text()) == report
    assert report["execution"]["mode"] == "ray" and report["execution"]["retries"] == {}


def test_minilm_tt_meets_the_parameter_target_and_reloads_identically(tmp_path):
    result = run_compression(example("minilm-tt", evaluation__items=100), tmp_path)  # MPO inference is slow: fewer pairs
    report = result.report
    check_report_shape(report, tmp_path)
    assert len(report["layers"]) == 12 and {row["method"] for row in report["layers"]} == {"tt"}
    assert report["target"]["achieved_ratio"] == pytest.approx(0.6, abs=0.006)
    before, after = report["metrics_before"], report["metrics_after"]
    assert before["lee50_pearson"] == pytest.approx(0.656, abs=0.01)
    assert 0 < after["lee50_pearson"] < before["lee50_pearson"]
    assert 0 < after["fidelity_mean_cosine"] < 1

    reloaded = load_compressed(tmp_path)
    assert type(reloaded.module.encoder.layer[0].intermediate.dense).__name__ == "MPOLinear"
    texts = lee_documents()[:16]
    with torch.inference_mode():
        assert torch.equal(encode(reloaded, texts)[0], encode(result.model, texts)[0])


def test_smollm2_int8_keeps_perplexity_and_quarter_size(tmp_path):
    report = run_compression(example("smollm2-int8"), tmp_path).report
    check_report_shape(report, tmp_path)
    before, after = report["metrics_before"]["perplexity"], report["metrics_after"]["perplexity"]
    assert 20 < before < 24
    assert abs(after - before) / before < 0.01
    assert report["bytes_after"] <= 0.27 * report["bytes_before"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    tied = {entry["name"]: entry["tied_to"] for entry in manifest["layers"] if entry["tied_to"]}
    assert tied == {"lm_head": "model.embed_tokens"}
    reloaded = load_compressed(tmp_path)
    assert reloaded.module.lm_head.weight_q is reloaded.module.model.embed_tokens.weight_q
    assert evaluate(reloaded, Task.PERPLEXITY, EvalOptions())["perplexity"] == after


def test_smollm2_activation_aware_svd_is_far_better_than_plain_svd(tmp_path):
    smaller = {"evaluation__tokens": 1024}
    aware = run_compression(example("smollm2-svd-aa", recipe__calibration={"data": "wikipedia", "tokens": 4096}, **smaller), tmp_path / "aa").report
    plain = run_compression(example("smollm2-svd-plain", **smaller), tmp_path / "plain").report
    for report in (aware, plain):
        assert report["target"]["achieved_ratio"] == pytest.approx(0.8, abs=0.008)
    aware_ppl, plain_ppl = aware["metrics_after"]["perplexity"], plain["metrics_after"]["perplexity"]
    assert aware_ppl * 100 < plain_ppl


def test_easyocr_activation_aware_tucker_reports_conv_parameters_and_keeps_accuracy(tmp_path):
    """Conv by conv (error-propagating), each conv's Tucker factors fitted on its input patches in a Ray task;
    kernel-only Tucker at this size loses 23 points."""
    report = run_compression(example("easyocr-tucker", evaluation__items=300, recipe__calibration={"items": 128, "propagate": True}),
                             tmp_path).report  # fmt: skip
    check_report_shape(report, tmp_path)
    tucker_rows = [row for row in report["layers"] if row["method"] == "tucker"]
    assert len(tucker_rows) == 5 and all(len(row["rank"]) == 2 for row in tucker_rows)
    assert report["target"]["achieved_ratio"] == pytest.approx(0.5, abs=0.005)
    assert report["metrics_before"]["word_accuracy"] >= 0.97
    assert report["metrics_before"]["word_accuracy"] - 0.1 <= report["metrics_after"]["word_accuracy"] <= report["metrics_before"]["word_accuracy"]
    assert report["execution"]["calibration"] == "propagated"
