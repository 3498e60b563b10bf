"""GPTQ rounding on real weights: it is round-to-nearest when the inputs are uncorrelated, it reproduces
MiniLM's outputs on held-out text better than round-to-nearest at int4, more so fed by error propagation,
and the spec says where it applies."""

from __future__ import annotations

import pytest
import torch

from krunch.run import calibration_grams
from krunch.execution.executors import InProcessExecutor, RayExecutor
from krunch.decompose.gptq import gptq_quantize
from krunch.runtime.quantized import QuantizedLinear
from krunch.plan import make_plan
from krunch.calibration.propagate import propagate
from krunch.runtime.quant import quantize
from krunch.spec import Calibration, CompressionJob, QuantizeConfig, Rounding, SpecError, parse_job
from tests.pipeline.test_propagate import compressed, held_out_error
from tests.pipeline.test_quantize import CONFIGS


def job(recipe: dict) -> CompressionJob:
    return parse_job({"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "t"},
                      "spec": {"model": {"source": "zoo:minilm-l6"}, "recipe": recipe}})  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"int{c.bits}-g{c.group_size}-{'sym' if c.symmetric else 'asym'}")
def test_uncorrelated_inputs_leave_nothing_to_compensate(minilm_ffn_weight, config):
    """With a diagonal Gram no column's error can be made up elsewhere: gptq stores what round-to-nearest stores."""
    columns = minilm_ffn_weight.shape[1]
    gram = torch.diag(torch.linspace(0.5, 2.0, columns, dtype=torch.float64))
    expected, got = quantize(minilm_ffn_weight, config), gptq_quantize(minilm_ffn_weight, gram, config)
    for name in ("values", "scale", "zero_point"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


def test_gram_must_match_the_inputs(minilm_ffn_weight):
    with pytest.raises(ValueError, match="Gram matrix"):
        gptq_quantize(minilm_ffn_weight, torch.eye(7), QuantizeConfig(bits=4))


INT4 = {"bits": 4, "groupSize": 64}
EVERY_LINEAR = [{"match": "encoder.layer.*", "method": "none"}]


@pytest.mark.slow
def test_gptq_reproduces_held_out_outputs_better_than_nearest(minilm):
    """All 36 MiniLM linears at int4 g64: the last hidden state's error on the evaluation half of the text."""
    executor = InProcessExecutor()
    nearest = job({"rules": EVERY_LINEAR, "quantize": INT4})
    rtn = held_out_error(minilm, compressed(minilm, executor.run(minilm, make_plan(minilm.module, nearest.spec.recipe), {}, {})))

    gptq = job({"rules": EVERY_LINEAR, "quantize": {**INT4, "rounding": "gptq"}, "calibration": {"tokens": 4096}})
    plan = make_plan(minilm.module, gptq.spec.recipe)
    assert all(layer.gptq for layer in plan.layers)
    independent = executor.run(minilm, plan, calibration_grams(gptq.spec.recipe, minilm, plan), {})
    assert all(isinstance(r.module, QuantizedLinear) and r.module.quantize_config.rounding == Rounding.GPTQ.value for r in independent.results)
    fitted = held_out_error(minilm, compressed(minilm, independent))
    chained = held_out_error(minilm, compressed(minilm, propagate(executor, minilm, plan, {}, Calibration(tokens=4096, propagate=True))))
    print(f"held-out error: nearest {rtn:.4f}, gptq {fitted:.4f}, gptq propagated {chained:.4f}")
    assert fitted < 0.9 * rtn
    assert chained < fitted


@pytest.mark.slow
def test_gptq_on_ray_stores_what_in_process_stores(minilm, ray_cluster):
    """Layer tasks get their Gram matrices on Ray too: the codes and scales equal the in-process run's."""
    gptq = job({"rules": [{"match": "encoder.layer.[01].*", "method": "none"}], "quantize": {**INT4, "rounding": "gptq"},
                "calibration": {"tokens": 1024}})  # fmt: skip
    plan = make_plan(minilm.module, gptq.spec.recipe)
    grams = calibration_grams(gptq.spec.recipe, minilm, plan)
    executor = RayExecutor(workers=2)
    with executor.session():
        remote = executor.run(minilm, plan, grams, {})
    local = InProcessExecutor().run(minilm, plan, grams, {})
    assert remote.info["mode"] == "ray" and len(remote.results) == 12
    for a, b in zip(remote.results, local.results, strict=True):
        assert a.name == b.name
        for name in ("values", "scale"):
            assert torch.equal(getattr(a.module.weight_q, name), getattr(b.module.weight_q, name)), (a.name, name)


def test_gptq_on_factors_is_refused_naming_the_field(minilm):
    recipe = job({"rules": [{"match": "encoder.layer.0.*", "method": "svd", "rank": {"fixed": 8},
                             "quantize": {"bits": 4, "rounding": "gptq"}}]}).spec.recipe  # fmt: skip
    with pytest.raises(SpecError, match=r"spec\.recipe\.rules\[0\]\.quantize\.rounding.*dense Linear"):
        make_plan(minilm.module, recipe)


def test_recipe_gptq_reaches_only_dense_linears(minilm, smollm2):
    recipe = job({"rules": [{"match": "encoder.layer.0.*", "method": "svd", "rank": {"fixed": 8}},
                            {"match": "encoder.layer.1.*", "method": "none"}],
                  "quantize": {"bits": 8, "rounding": "gptq"}}).spec.recipe  # fmt: skip
    rounding = {layer.rule_index: layer.quantize.rounding for layer in make_plan(minilm.module, recipe).layers}
    assert rounding == {0: Rounding.NEAREST, 1: Rounding.GPTQ}

    # SmolLM2's LM head shares the embedding's weight: it is stored once, as the embedding (never gptq) rounds it
    tied = job({"rules": [{"match": "model.embed_tokens", "method": "none"}, {"match": "lm_head", "method": "none"}],
                "quantize": {"bits": 8, "rounding": "gptq"}}).spec.recipe  # fmt: skip
    head = next(layer for layer in make_plan(smollm2.module, tied).layers if layer.name == "lm_head")
    assert head.tied_to == "model.embed_tokens" and not head.gptq and not head.calibrated


def test_spec_places_rounding_and_propagation():
    with pytest.raises(SpecError, match=r"spec\.recipe\.rules\[0\]\.quantize: under target\.bytesRatio"):
        job({"target": {"bytesRatio": 0.2}, "rules": [{"match": "*", "method": "svd", "quantize": {"bits": 4}}]})
    propagated = job({"rules": EVERY_LINEAR, "quantize": {"bits": 4, "rounding": "gptq"}, "calibration": {"propagate": True}})
    assert propagated.spec.recipe.needs_calibration
    with pytest.raises(SpecError, match="calibration.propagate.*gptq rounding"):
        job({"rules": EVERY_LINEAR, "quantize": {"bits": 4}, "calibration": {"propagate": True}})
    with pytest.raises(SpecError, match=r"spec\.recipe\.quantize\.rounding"):
        job({"rules": EVERY_LINEAR, "quantize": {"bits": 4, "rounding": "optimal"}})
