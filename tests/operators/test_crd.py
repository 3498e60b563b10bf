"""The CRD is generated from the pipeline's spec model: no drift, and it accepts and rejects what the
pipeline does wherever a schema can say it (jsonschema, under kubectl's strict field validation)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from krunch.operator.crd import CRD_PATH, render, validation_schema
from krunch.spec import SpecError, parse_job

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = validation_schema(yaml.safe_load(CRD_PATH.read_text(encoding="utf-8")))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_committed_crd_is_what_the_spec_model_generates():
    assert CRD_PATH.read_text(encoding="utf-8") == render(), "run: python scripts/gen_crd.py"
    check = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_crd.py"), "--check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr


def test_crd_shape():
    document = yaml.safe_load(CRD_PATH.read_text(encoding="utf-8"))
    assert document["metadata"]["name"] == "compressionjobs.krunch.dev"
    assert document["spec"]["names"]["shortNames"] == ["cj"] and document["spec"]["scope"] == "Namespaced"
    version = document["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Progress", "Ratio", "Model-Version", "Age"]
    assert "$ref" not in CRD_PATH.read_text() and "anyOf" not in CRD_PATH.read_text()  # structural


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates_against_the_crd_and_the_pipeline(example, validator):
    document = yaml.safe_load(example.read_text(encoding="utf-8"))
    validator.validate(document)
    parse_job(document)


def _bad(path: str, value: object) -> dict:
    document = yaml.safe_load(EXAMPLES[0].read_text(encoding="utf-8"))
    node = document
    *parents, last = path.split(".")
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[last] = value
    return document


BAD = {
    "unknown method": ("spec.recipe.rules.0.method", "magic"),
    "16-bit quantization": ("spec.recipe.quantize", {"bits": 16}),
    "rank zero": ("spec.recipe.rules.0.rank", {"fixed": 0}),
    "two rank rules": ("spec.recipe.rules.0.rank", {"fixed": 8, "energy": 0.9}),
    "energy above one": ("spec.recipe.rules.0.rank", {"energy": 1.5}),
    "paramRatio of one": ("spec.recipe.target", {"paramRatio": 1}),
    "no rules": ("spec.recipe.rules", []),
    "unknown field": ("spec.recipe.rules.0.shape", "x"),
    "registry name with a slash": ("spec.registry", {"name": "team/model"}),
    "reserved-looking alias": ("spec.registry", {"name": "m", "alias": "has space"}),
    "negative gpus": ("spec.resources", {"gpusPerTask": -1}),
    "no source": ("spec.model", {"factory": "a:b"}),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_specs_are_rejected_by_the_crd_and_by_the_pipeline(case, validator):
    document = _bad(*copy.deepcopy(BAD[case]))
    assert list(validator.iter_errors(document)), f"the CRD accepted: {case}"
    with pytest.raises(SpecError):
        parse_job(document)
