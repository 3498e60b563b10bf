"""Quantization below 4 bits with a low-rank compensation branch (method lqer), on real SmolLM2 layers and
their calibration inputs: the branch lowers the output error by a fifth or more, costs fewer bytes than one
more bit would, the layer saves and loads exactly, and the recipe refuses what cannot work, naming the field.
(One more bit still lowers the error more than a rank-16 branch does: docs/bench_quality.md.)"""

from __future__ import annotations

import pytest
import torch

import krunch
from krunch.calibration.grams import collect_grams
from krunch.decompose.compensate import compensated_quantize
from krunch.decompose.grid import fitted_to_inputs, output_errors
from krunch.execution.executors import InProcessExecutor
from krunch.runtime.linear import CompensatedLinear
from krunch.runtime.quant import QuantFormat, dequantize
from krunch.sizes import weight_bytes
from krunch.spec import Calibration, SpecError, parse_job

LAYERS = ["model.layers.5.self_attn.q_proj", "model.layers.5.mlp.down_proj"]


def job(recipe: dict) -> krunch.spec.CompressionJob:
    return parse_job({"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "t"},
                      "spec": {"model": {"source": "zoo:smollm2-135m"}, "recipe": recipe}})  # fmt: skip


@pytest.fixture(scope="module")
def grams(smollm2) -> dict[str, torch.Tensor]:
    return collect_grams(smollm2, LAYERS, Calibration(tokens=1024))


def fmt(bits: int) -> QuantFormat:
    return QuantFormat(bits, 64, False, grid="fitted")


@pytest.mark.parametrize("bits", [2, 3])
def test_the_branch_lowers_the_output_error_for_fewer_bytes_than_a_wider_code(smollm2, grams, bits):
    for name in LAYERS:
        source, gram = smollm2.module.get_submodule(name), grams[name]
        weight = source.weight.detach()
        alone = output_errors(weight, dequantize(fitted_to_inputs(weight, gram, fmt(bits)), False), gram).sum()
        codes, branch = compensated_quantize(weight, fmt(bits), 16, gram)
        compensated = output_errors(weight, dequantize(codes, False) + branch.left @ branch.right, gram).sum()
        assert compensated < 0.8 * alone, name
        layer = CompensatedLinear.from_parts(source, fmt(bits), codes, branch)
        plain = krunch.runtime.quantized.QuantizedLinear.from_dense(source, fmt(bits + 1))
        assert weight_bytes(layer) < weight_bytes(plain), name  # int{bits} + a rank-16 int8 branch < int{bits + 1}


def test_compensated_layers_run_save_and_load(smollm2, tmp_path):
    recipe = job({"rules": [{"match": "model.layers.0.self_attn.[qk]_proj", "method": "lqer", "rank": {"fixed": 16}, "activationAware": True}],
                  "quantize": {"bits": 3, "groupSize": 64, "symmetric": False, "grid": "fitted"}, "calibration": {"tokens": 512}}).spec.recipe  # fmt: skip
    result = krunch.compress(smollm2, recipe, executor=InProcessExecutor())
    layer = result.module.model.layers[0].self_attn.q_proj
    assert isinstance(layer, CompensatedLinear) and layer.kernels() == {"weight_q": "dequantize", "right": "int8pack", "left": "int8pack"}
    x = torch.randn(2, 576)
    with torch.no_grad():
        reference = torch.nn.functional.linear(x, layer.to_dense())
        assert float((layer(x) - reference).norm() / reference.norm()) < 0.01
    krunch.save(result, tmp_path / "out")
    loaded = krunch.load(tmp_path / "out")
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, result.module(input_ids=ids).logits)


def test_the_recipe_refuses_what_cannot_work_naming_the_field():
    rule = {"match": "model.layers.0.*", "method": "lqer", "rank": {"fixed": 8}}
    with pytest.raises(SpecError, match=r"spec\.recipe\.rules\[0\]\.quantize.*stores a quantized weight"):
        job({"rules": [rule]})
    with pytest.raises(SpecError, match=r"rules\[0\]\.rank: required for method lqer"):
        job({"rules": [{k: v for k, v in rule.items() if k != "rank"}], "quantize": {"bits": 3}})
    with pytest.raises(SpecError, match=r"rules\[0\]\.rank: lqer needs rank\.fixed"):
        job({"rules": [{k: v for k, v in rule.items() if k != "rank"}], "quantize": {"bits": 3}, "target": {"paramRatio": 0.5}})
    with pytest.raises(SpecError, match=r"spec\.recipe\.quantize\.bits"):
        job({"rules": [rule], "quantize": {"bits": 5}})
    assert job({"rules": [rule], "quantize": {"bits": 2, "groupSize": 64}}).spec.recipe.quantize.bits == 2
