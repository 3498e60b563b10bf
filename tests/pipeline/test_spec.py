"""The job spec: the documented example parses; bad input names the field path and the reason."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from krunch.spec import SpecError, load_job, parse_job

EXAMPLE = {
    "apiVersion": "krunch.dev/v1alpha1",
    "kind": "CompressionJob",
    "metadata": {"name": "smollm2-tt", "uid": "1234"},
    "spec": {
        "model": {"source": "zoo:smollm2-135m"},
        "recipe": {
            "target": {"paramRatio": 0.7},
            "rules": [
                {"match": "model.layers.0.*", "method": "none"},
                {"match": "*.mlp.*", "method": "svd", "activationAware": True},
                {"match": "*.self_attn.*", "method": "tt", "rank": {"energy": 0.98}},
            ],
            "quantize": {"bits": 8, "groupSize": 128, "symmetric": True},
            "calibration": {"data": "wikipedia", "tokens": 8192},
        },
        "evaluation": {"task": "perplexity", "data": "wikipedia", "tokens": 4096},
        "resources": {"workers": 2, "gpusPerTask": 0},
        "registry": {"name": "smollm2-compressed", "alias": "candidate"},
    },
}


def mutated(change) -> dict:
    document = copy.deepcopy(EXAMPLE)
    change(document)
    return document


def test_the_documented_example_parses():
    job = parse_job(EXAMPLE)
    recipe = job.spec.recipe
    assert recipe.target.param_ratio == 0.7
    assert [r.method for r in recipe.rules] == ["none", "svd", "tt"]
    assert recipe.rules[2].rank.energy == 0.98 and recipe.quantize.group_size == 128
    assert job.spec.resources.workers == 2 and job.spec.registry.alias == "candidate"
    assert recipe.needs_calibration
    assert job.metadata.model_extra == {"uid": "1234"}


def test_every_example_file_in_the_repository_parses():
    files = sorted(Path(__file__).parents[2].joinpath("examples").glob("*.yaml"))
    assert len(files) >= 4
    for path in files:
        assert load_job(path).metadata.name == path.stem


@pytest.mark.parametrize(
    ("change", "path", "reason"),
    [
        (lambda d: d["spec"]["recipe"]["rules"][1].update(method="magic"), "spec.recipe.rules[1].method", "'svd', 'tt'"),
        (lambda d: d["spec"]["recipe"]["rules"][2]["rank"].update(fixed=8), "spec.recipe.rules[2].rank", "exactly one of fixed, energy, maxError"),
        (lambda d: d["spec"]["recipe"]["quantize"].update(bits=5), "spec.recipe.quantize.bits", "2, 3, 4 or 8"),
        (lambda d: d["spec"]["model"].pop("source"), "spec.model.source", "Field required"),
        (lambda d: d["spec"]["recipe"].pop("target"), "spec.recipe.rules[1].rank", "required for method svd unless a target is set"),
        (lambda d: d["spec"]["recipe"]["rules"][0].update(quantize=True), "spec.recipe.rules[0].quantize", "true is ambiguous"),
        (lambda d: d["spec"]["recipe"]["rules"][0].update(mach="x"), "spec.recipe.rules[0].mach", "Extra inputs are not permitted"),
        (lambda d: d["spec"]["recipe"]["rules"][0].update(method="cp", rank={"fixed": 4}, activationAware=True),
         "spec.recipe.rules[0]", "activationAware is available for methods svd, tt, tucker, lqer, not"),
        (lambda d: d["spec"]["recipe"]["rules"][0].update(method="tt", rank={"fixed": 4}, form="factors"),
         "spec.recipe.rules[0]", "method tt has no form"),
        (lambda d: d["spec"]["recipe"]["rules"][0].update(form="diagonal"), "spec.recipe.rules[0].form", "'pivoted' or 'factors'"),
        (lambda d: d["spec"]["recipe"]["target"].update(paramRatio=1.5), "spec.recipe.target.paramRatio", "less than 1"),
        (lambda d: d["spec"]["evaluation"].update(task="bleu"), "spec.evaluation.task", "unknown task 'bleu'"),
        (lambda d: d["spec"]["evaluation"].update(task="embedding", compiledDecode=True), "spec.evaluation", "compiledDecode measures"),
        (lambda d: d.update(kind="Pod"), "kind", "not a CompressionJob"),
        (lambda d: d["spec"]["recipe"].update(rules=[]), "spec.recipe.rules", "at least 1 item"),
    ],
)
def test_bad_fields_are_named(change, path, reason):
    with pytest.raises(SpecError) as caught:
        parse_job(mutated(change))
    assert caught.value.subject == path
    assert reason in caught.value.reason


def test_a_rule_may_turn_quantization_off_or_override_it():
    job = parse_job(mutated(lambda d: d["spec"]["recipe"]["rules"][0].update(quantize=False)))
    default = job.spec.recipe.quantize
    assert job.spec.recipe.rules[0].quantize_config(default) is None
    job = parse_job(mutated(lambda d: d["spec"]["recipe"]["rules"][0].update(quantize={"bits": 4})))
    assert job.spec.recipe.rules[0].quantize_config(default).bits == 4
    assert job.spec.recipe.rules[1].quantize_config(default).bits == 8


def test_job_files(tmp_path):
    with pytest.raises(SpecError, match="job file not found"):
        load_job(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("spec: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job(tmp_path / "bad.yaml")
    (tmp_path / "two.yaml").write_text("a: 1\n---\nb: 2\n")
    with pytest.raises(SpecError, match="expected one CompressionJob document, found 2"):
        load_job(tmp_path / "two.yaml")
