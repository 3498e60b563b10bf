"""Fitted quantization grids on real weights and real calibration inputs: never worse than the range grid by
the measure each is fitted to, clearly better at int4, gptq on a fixed fitted grid in activation order, and the
recipe says where the data weighs in."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from krunch.calibration.grams import collect_grams
from krunch.decompose.grid import fitted_to_inputs, output_errors
from krunch.decompose.gptq import gptq_quantize
from krunch.plan import make_plan
from krunch.runtime.kernels import Kernel
from krunch.runtime.quant import QuantFormat, dequantize, fitted_scales, group_scales, grouped_view, integer_codes, quantize, restored
from krunch.runtime.quantized import QuantizedLinear
from krunch.spec import Calibration, CompressionJob, SpecError, parse_job
from tests.pipeline.test_quantize import CONFIGS

BLOCK = [f"model.layers.3.{name}" for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
INT4 = [QuantFormat(4, 64, True, grid="fitted"), QuantFormat(4, 64, False, grid="fitted")]


def job(recipe: dict, source: str = "zoo:smollm2-135m") -> CompressionJob:
    return parse_job({"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "t"},
                      "spec": {"model": {"source": source}, "recipe": recipe}})  # fmt: skip


@pytest.fixture(scope="module")
def block_grams(smollm2) -> dict[str, torch.Tensor]:
    """The Gram matrices of one SmolLM2 block's linears' inputs, on 1024 tokens of the calibration half."""
    return collect_grams(smollm2, BLOCK, Calibration(tokens=1024))


def group_errors(weight: torch.Tensor, config: QuantFormat, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    grouped = grouped_view(weight, config)
    z = zero[..., None] if zero.numel() else zero
    return ((grouped - restored(integer_codes(grouped, scale[..., None], z, config), scale[..., None], z, config)) ** 2).sum(-1)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"int{c.bits}-g{c.group_size}-{'sym' if c.symmetric else 'asym'}")
def test_a_data_free_fitted_grid_never_has_a_group_with_more_error(minilm_ffn_weight, config):
    fmt = dataclasses.replace(QuantFormat.of(config), grid="fitted")
    grouped = grouped_view(minilm_ffn_weight, fmt)
    fitted = group_errors(minilm_ffn_weight, fmt, *fitted_scales(grouped, fmt))
    plain = group_errors(minilm_ffn_weight, fmt, *group_scales(grouped, fmt))
    assert (fitted <= plain).all()
    assert fitted.sum() < (0.97 if fmt.bits == 4 else 0.995) * plain.sum()  # clipping pays, most at 4 bits
    stored = quantize(minilm_ffn_weight, fmt)  # what a layer stores is that grid's codes
    expected = ((dequantize(stored, fmt.symmetric) - minilm_ffn_weight) ** 2).sum()
    assert torch.isclose(expected, fitted.sum(), rtol=1e-4)


@pytest.mark.parametrize("config", INT4, ids=["sym", "asym"])
def test_a_grid_fitted_to_the_inputs_never_raises_a_rows_output_error(smollm2, block_grams, config):
    """Every output row of five real layers, measured on the calibration inputs (e H e'), is at most what the
    range grid gives; over a layer the error falls by at least a tenth."""
    for name in BLOCK:
        weight, gram = smollm2.module.get_submodule(name).weight.detach(), block_grams[name]
        fitted = output_errors(weight, dequantize(fitted_to_inputs(weight, gram, config), config.symmetric), gram)
        plain = output_errors(weight, dequantize(quantize(weight, dataclasses.replace(config, grid="range")), config.symmetric), gram)
        assert (fitted <= plain).all(), name
        assert fitted.sum() < 0.9 * plain.sum(), (name, float(fitted.sum() / plain.sum()))


def test_gptq_on_the_fitted_grid_keeps_its_scales_and_lowers_the_output_error(smollm2, block_grams):
    config = INT4[1]
    for name in BLOCK[:3]:
        weight, gram = smollm2.module.get_submodule(name).weight.detach(), block_grams[name]
        nearest = fitted_to_inputs(weight, gram, config)
        rounded = gptq_quantize(weight, gram, config)
        scale, zero = fitted_scales(grouped_view(weight, config), config, grouped_view(gram.diagonal().float().reshape(1, -1), config))
        assert torch.equal(rounded.scale, scale) and torch.equal(rounded.zero_point, zero.to(torch.uint8))  # fixed before compensation
        gptq_error = output_errors(weight, dequantize(rounded, config.symmetric), gram).sum()
        assert gptq_error < 0.9 * output_errors(weight, dequantize(nearest, config.symmetric), gram).sum(), name


def test_fitted_layers_run_on_the_int4_kernel_and_equal_their_reference(smollm2, block_grams):
    source = smollm2.module.get_submodule(BLOCK[3])
    config = INT4[1]
    layer = QuantizedLinear.from_dense(source, config, fitted_to_inputs(source.weight.detach(), block_grams[BLOCK[3]], config))
    assert layer.weight_q.kernel()[0] is Kernel.INT4_CPU
    assert layer.config()["quantize_config"]["grid"] == "fitted"
    x = torch.randn(1, source.in_features)
    reference = torch.nn.functional.linear(x.bfloat16(), layer.to_dense().bfloat16()).float()
    assert float((layer(x) - reference).norm() / reference.norm()) < 0.01  # both round to bf16 along the way
    assert "fitted grid" in repr(layer)


def test_manifests_record_the_grid_and_read_earlier_ones():
    fitted = QuantFormat(4, 64, False, "gptq", "fitted")
    assert QuantFormat.from_json(fitted.to_json()) == fitted
    assert "grid" not in QuantFormat(4, 64).to_json()  # range-grid manifests as before
    assert QuantFormat.from_json({"bits": 8, "groupSize": None, "symmetric": True}).grid == "range"


def test_the_recipe_says_where_calibration_data_weighs_in(smollm2):
    linears = [{"match": "model.layers.0.*", "method": "none"}, {"match": "model.layers.1.mlp.*", "method": "svd", "rank": {"fixed": 16}}]
    quantize = {"bits": 4, "groupSize": 64, "grid": "fitted"}
    free = job({"rules": linears, "quantize": quantize}).spec.recipe
    assert not free.uses_calibration and not any(layer.calibrated for layer in make_plan(smollm2.module, free).layers)
    aware = job({"rules": linears, "quantize": quantize, "calibration": {"tokens": 1024}}).spec.recipe
    assert aware.uses_calibration and not aware.needs_calibration
    calibrated = {layer.name: layer.grid_fitted_to_inputs for layer in make_plan(smollm2.module, aware).layers}
    assert all(calibrated[name] for name in calibrated if name.startswith("model.layers.0."))
    assert not any(calibrated[name] for name in calibrated if name.startswith("model.layers.1."))  # factors: data-free fit
    assert job({"rules": linears, "quantize": quantize, "calibration": {"propagate": True}}).spec.recipe.calibration.propagate
    # SmolLM2's LM head shares the embedding's weight: stored once, as the embedding's data-free fit rounds it
    tied = job({"rules": [{"match": "model.embed_tokens", "method": "none"}, {"match": "lm_head", "method": "none"}],
                "quantize": {"bits": 8, "grid": "fitted"}, "calibration": {"tokens": 1024}}).spec.recipe  # fmt: skip
    head = next(layer for layer in make_plan(smollm2.module, tied).layers if layer.name == "lm_head")
    assert head.tied_to == "model.embed_tokens" and not head.grid_fitted_to_inputs and not head.calibrated
    with pytest.raises(SpecError, match=r"spec\.recipe\.quantize\.grid"):
        job({"rules": linears, "quantize": {**quantize, "grid": "best"}})
