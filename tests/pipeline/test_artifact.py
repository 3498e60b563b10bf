"""Saved compressed models reload without pickle, and tampered files are refused."""

from __future__ import annotations

import json

import pytest
import torch

from krunch.artifact import load_compressed, save_compressed
from krunch.assemble import assemble
from krunch.execution.layer import compress_layer
from krunch.errors import ModelSourceError
from krunch.plan import make_plan
from krunch.spec import Recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def saved(tmp_path_factory, mobilenet):
    """MobileNetV2 with its classifier low-rank + int8 and every pointwise conv int4, saved."""
    import copy

    recipe = Recipe.model_validate({"rules": [
        {"match": "classifier.1", "method": "svd", "rank": {"fixed": 200}, "quantize": {"bits": 8}},
        {"match": "features.*.conv.*", "method": "none", "quantize": {"bits": 4, "groupSize": 16}},
    ]})  # fmt: skip
    plan = make_plan(mobilenet.module, recipe)
    compressed = copy.deepcopy(mobilenet)
    replacements = {layer.name: compress_layer(layer, mobilenet.module.get_submodule(layer.name)).module for layer in plan.layers}
    assemble(compressed.module, replacements, {})
    directory = tmp_path_factory.mktemp("mobilenet-compressed")
    save_compressed(directory, compressed, {"source": "zoo:mobilenet-v2", "factory": None}, recipe.model_dump(by_alias=True, mode="json"), {})
    return directory, compressed


def test_reload_gives_identical_outputs(saved):
    directory, compressed = saved
    reloaded = load_compressed(directory)
    image = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(reloaded.module(image), compressed.module(image))
    assert type(reloaded.module.classifier[1]).__name__ == "PivotedLowRankLinear"


def test_unknown_layer_type_in_manifest_is_refused(saved, tmp_path):
    directory, _ = saved
    for name in ("model.safetensors", "manifest.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["layers"][0]["type"] = "subprocess.Popen"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelSourceError, match="unknown layer type 'subprocess.Popen'"):
        load_compressed(tmp_path)


def test_weights_that_do_not_match_the_manifest_are_refused(saved, tmp_path):
    directory, _ = saved
    manifest = json.loads((directory / "manifest.json").read_text())
    low_rank = next(entry for entry in manifest["layers"] if entry["type"] == "PivotedLowRankLinear")
    low_rank["config"]["rank"] = 100
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    with pytest.raises(ModelSourceError, match="does not match the manifest"):
        load_compressed(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelSourceError, match="does not match the manifest"):
        load_compressed(tmp_path)


def test_not_a_compressed_directory(tmp_path):
    with pytest.raises(ModelSourceError, match="no manifest.json"):
        load_compressed(tmp_path)
