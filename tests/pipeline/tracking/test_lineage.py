"""Lineage tags and params: pure functions of the job and its report."""

from __future__ import annotations

import pytest

from krunch.registry.lineage import flatten, job_identity, method_summary, quality_delta, recipe_hash, version_tags
from krunch.spec import SpecError, parse_job

JOB = {
    "apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "j"},
    "spec": {"model": {"source": "zoo:easyocr-g2"},
             "recipe": {"rules": [{"match": "*.ConvNet.11", "method": "tucker", "rank": {"fixed": 64}}], "quantize": {"bits": 8}},
             "registry": {"name": "ocr-small", "alias": "candidate"}},
}  # fmt: skip
REPORT = {"task": "perplexity", "compression_ratio": 3.9, "bytes_after": 100, "metrics_before": {"perplexity": 20.0},
          "metrics_after": {"perplexity": 25.0}, "layers": [{"method": "svd"}, {"method": "svd"}, {"method": "none"}]}  # fmt: skip


def job(**changes):
    document = {**JOB, "metadata": {**JOB["metadata"]}, "spec": {**JOB["spec"]}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        document[section][field] = value
    return parse_job(document)


def test_identity_is_the_kubernetes_uid_when_there_is_one_else_a_digest_of_the_job():
    assert job_identity(job(metadata__uid="7d0c")) == "uid:7d0c"
    assert job_identity(job()) == job_identity(job())
    assert job_identity(job()).startswith("spec:")
    assert job_identity(job()) != job_identity(job(metadata__name="other"))


def test_recipe_hash_follows_the_recipe_only():
    assert recipe_hash(job()) == recipe_hash(job(metadata__name="other"))
    changed = {**JOB["spec"]["recipe"], "quantize": {"bits": 4}}
    assert recipe_hash(job()) != recipe_hash(job(spec__recipe=changed))


def test_quality_delta_is_negative_when_worse_whichever_way_the_metric_points():
    assert quality_delta(REPORT) == pytest.approx(-0.25)
    accuracy = {**REPORT, "task": "ocr", "metrics_before": {"word_accuracy": 0.8}, "metrics_after": {"word_accuracy": 0.6}}
    assert quality_delta(accuracy) == pytest.approx(-0.25)


def test_version_tags_carry_lineage():
    tags = version_tags(job(metadata__uid="u-1"), REPORT | {"source_version": "3"})
    assert tags["krunch.source"] == "zoo:easyocr-g2" and tags["krunch.source_version"] == "3"
    assert tags["krunch.k8s_uid"] == "u-1" and tags["krunch.job_id"] == "uid:u-1"
    assert tags["krunch.methods"] == "svd x2, none x1; int8" == method_summary(job(), REPORT)
    assert tags["krunch.quality_before"] == "20.0" and tags["krunch.quality_after"] == "25.0"
    assert all(isinstance(value, str) for value in tags.values())


def test_flatten_gives_mlflow_param_keys():
    flat = flatten({"recipe": {"rules": [{"match": "*", "rank": {"fixed": 3}}]}})
    assert flat == {"recipe.rules.0.match": "*", "recipe.rules.0.rank.fixed": "3"}


@pytest.mark.parametrize(("name", "alias", "field"), [
    ("team/model", None, "spec.registry.name"), ("a:b", None, "spec.registry.name"), ("..", None, "spec.registry.name"),
    ("ok", "latest", "spec.registry.alias"), ("ok", "v2", "spec.registry.alias"), ("ok", "has space", "spec.registry.alias"),
])  # fmt: skip
def test_registry_names_mlflow_would_refuse_are_rejected_in_the_spec(name, alias, field):
    with pytest.raises(SpecError) as caught:
        job(spec__registry={"name": name, "alias": alias})
    assert caught.value.subject == field
