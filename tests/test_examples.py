"""Every job in examples/ runs both ways: `krunch compress` plans it (dry run: validate and plan, no work),
and the CRD's schema, what `kubectl apply` is checked against, accepts it (tests/operators/test_crd.py).
Together they cover every method family and every zoo model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from krunch.methods.registry import BUILTIN
from krunch.spec import Grid, Rounding, parse_job
from krunch.zoo.registry import zoo_names

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
KRUNCH = Path(sys.executable).with_name("krunch")


def test_examples_cover_every_method_family_and_zoo_model():
    jobs = [parse_job(yaml.safe_load(path.read_text())) for path in EXAMPLES]
    used = {rule.method for job in jobs for rule in job.spec.recipe.rules}
    assert used == set(BUILTIN)
    assert {job.spec.recipe.quantize.bits for job in jobs if job.spec.recipe.quantize} == {3, 4, 8}
    assert {job.spec.recipe.quantize.rounding for job in jobs if job.spec.recipe.quantize} == set(Rounding)
    assert {job.spec.recipe.quantize.grid for job in jobs if job.spec.recipe.quantize} == set(Grid)
    assert any(job.spec.recipe.heal for job in jobs) and any(job.spec.recipe.calibration and job.spec.recipe.calibration.propagate for job in jobs)
    assert any(rule.floor for job in jobs for rule in job.spec.recipe.rules)
    benchmark_only = {"qwen2.5-coder-1.5b"}  # installed by scripts/setup_large_model.sh, not by setup.sh: no dry run here
    assert {job.spec.model.source.removeprefix("zoo:") for job in jobs} >= set(zoo_names()) - benchmark_only


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_krunch_compress_dry_run_plans_the_example(example: Path, tmp_path: Path):
    result = subprocess.run([str(KRUNCH), "compress", str(example), "--dry-run", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env=os.environ | {"TQDM_DISABLE": "1"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    name = yaml.safe_load(example.read_text())["metadata"]["name"]
    assert f"{name}: zoo:" in result.stdout and "dry run: the job is valid" in result.stdout
    assert ("gptq rounding" in result.stdout) == ("rounding: gptq" in example.read_text())
    assert ("fitted grid" in result.stdout) == ("grid: fitted" in example.read_text())
    assert not (tmp_path / "out").exists()
