"""Rule floors on the real MiniLM: a floor holds every layer of its rule above that share of its parameters
under either target, the rest of the budget still fits, and a floor that cannot hold names its field."""

from __future__ import annotations

import pytest

from krunch.run import allocate_ranks, allocate_target
from krunch.plan import factorised_params, make_plan
from krunch.spec import CompressionJob, SpecError, parse_job

pytestmark = pytest.mark.slow

EARLY = {"match": "encoder.layer.[01].*", "method": "svd"}  # CompactifAI: spare the early layers
REST = {"match": "encoder.layer.*", "method": "svd"}


def job(target: dict, rules: list[dict]) -> CompressionJob:
    return parse_job({"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "t"},
                      "spec": {"model": {"source": "zoo:minilm-l6"}, "recipe": {"target": target, "rules": rules}}})  # fmt: skip


def kept_share(plan, name: str, rank: int) -> float:
    layer = next(layer for layer in plan.layers if layer.name == name)
    return factorised_params(layer, rank) / layer.weight_params


def test_a_rule_floor_holds_its_layers_and_the_budget_still_fits(minilm):
    unfloored = job({"paramRatio": 0.5}, [EARLY, REST])
    floored = job({"paramRatio": 0.5}, [{**EARLY, "floor": 0.8}, REST])
    plan = make_plan(minilm.module, floored.spec.recipe)
    before = allocate_ranks(unfloored.spec.recipe, minilm, make_plan(minilm.module, unfloored.spec.recipe))
    after = allocate_ranks(floored.spec.recipe, minilm, plan)

    early = [layer.name for layer in plan.layers if layer.rule_index == 0]
    assert min(kept_share(plan, name, before[name]) for name in early) < 0.8  # the floor changes something
    assert all(kept_share(plan, name, after[name]) >= 0.8 for name in early)
    budget = 0.5 * sum(layer.params for layer in plan.layers) - sum(layer.bias_params for layer in plan.layers)
    spent = sum(factorised_params(layer, after[layer.name]) for layer in plan.layers)
    assert 0.99 * budget < spent <= budget  # the other layers gave up what the early ones kept
    rest = [layer.name for layer in plan.layers if layer.rule_index == 1]
    assert sum(after[n] for n in rest) < sum(before[n] for n in rest)


def test_a_floor_under_bytes_ratio_keeps_factorised_layers_large_and_lets_quantized_ones_be(minilm):
    floored = job({"bytesRatio": 0.15}, [{**EARLY, "floor": 0.9}, REST])
    plan = make_plan(minilm.module, floored.spec.recipe)
    allocation = allocate_target(floored.spec.recipe, minilm, plan)
    layers = {layer.name: layer for layer in plan.layers}
    early = [t for t in allocation.budget["tables"] if t["name"].startswith(("encoder.layer.0.", "encoder.layer.1."))]
    for table in early:
        ranks = [int(c["choice"].split()[1]) for c in table["candidates"] if c["choice"].startswith("rank")]
        assert all(factorised_params(layers[table["name"]], rank) >= 0.9 * layers[table["name"]].weight_params for rank in ranks)
    assert any(c["choice"].startswith("dense int") for t in early for c in t["candidates"])
    assert allocation.budget["planned_bytes"] <= allocation.budget["budget_bytes"]


def test_floors_that_cannot_hold_name_their_field(minilm):
    impossible = job({"paramRatio": 0.5}, [{**EARLY, "floor": 0.999}, REST])
    with pytest.raises(SpecError, match=r"spec\.recipe\.rules\[0\]\.floor: 0\.999 of encoder\.layer\.0\..*\(break-even rank 383\)"):
        allocate_ranks(impossible.spec.recipe, minilm, make_plan(minilm.module, impossible.spec.recipe))
    greedy = job({"paramRatio": 0.3}, [{**REST, "floor": 0.9}])
    with pytest.raises(SpecError, match=r"spec\.recipe\.target\.paramRatio: .*rule floors \(spec\.recipe\.rules\[0\]\.floor\)"):
        allocate_ranks(greedy.spec.recipe, minilm, make_plan(minilm.module, greedy.spec.recipe))


@pytest.mark.parametrize("recipe", [
    {"rules": [{**REST, "rank": {"fixed": 8}, "floor": 0.5}], "target": {"paramRatio": 0.5}},
    {"rules": [{**REST, "rank": {"fixed": 8}, "floor": 0.5}]},
    {"rules": [{"match": "*", "method": "none", "floor": 0.5}], "target": {"paramRatio": 0.5}},
])  # fmt: skip
def test_a_floor_where_no_target_sets_the_rank_is_refused(recipe):
    with pytest.raises(SpecError, match=r"rules\[0\]\.floor: only for factorising rules without a rank"):
        parse_job({"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "t"},
                   "spec": {"model": {"source": "zoo:minilm-l6"}, "recipe": recipe}})




def spectral_errors(model, recipe, ranks: dict[str, int]) -> dict[str, float]:
    """Each allocated layer's relative truncation error at its chosen rank, from its weight's spectrum."""
    import dataclasses

    from krunch.plan.profile import profile

    errors = {}
    for layer in make_plan(model.module, recipe).allocated:
        unbounded = dataclasses.replace(layer, max_error=1.0)
        spectra = layer.implementation.spectra(layer, model.module.get_submodule(layer.name).weight, None)
        option = next(o for o in profile(unbounded, spectra).options if o.rank == ranks[layer.name])
        errors[layer.name] = option.error**0.5
    return errors


def mobilenet_recipe(ratio: float, **extra):
    """Tucker on MobileNetV2's 1x1 projection convs and its head conv: near full rank, so at a budget the
    spectra alone would starve some layer (the head conv got rank 7 of 320 at 0.5 without a ceiling)."""
    rules = [{"match": "features.*.conv.2", "method": "tucker", **extra}, {"match": "features.18.0", "method": "tucker", **extra}]
    return parse_job({"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "t"},
                      "spec": {"model": {"source": "zoo:mobilenet-v2"},
                               "recipe": {"target": {"paramRatio": ratio}, "rules": rules}}}).spec.recipe  # fmt: skip


def test_the_allocator_never_cuts_a_layer_past_its_error_ceiling(mobilenet):
    worst = {}
    for ceiling, recipe in ((1.0, mobilenet_recipe(0.6, maxError=1)), (0.9, mobilenet_recipe(0.6))):
        ranks = allocate_ranks(recipe, mobilenet, make_plan(mobilenet.module, recipe))
        worst[ceiling] = max(spectral_errors(mobilenet, recipe, ranks).values())
    assert worst[1.0] > 0.9  # without a ceiling one layer is destroyed to spare the others
    assert worst[0.9] <= 0.9
    tight = mobilenet_recipe(0.5)  # the ceiling leaves no way to fit this budget: said, naming both causes
    with pytest.raises(SpecError, match=r"target\.paramRatio: .*error ceilings \(maxError, default 0\.9\)"):
        allocate_ranks(tight, mobilenet, make_plan(mobilenet.module, tight))


def test_a_ceiling_no_rank_can_meet_names_its_field(mobilenet):
    recipe = mobilenet_recipe(0.6, maxError=0.01)
    with pytest.raises(SpecError, match=r"rules\[0\]\.maxError: every rank of features\..* above 0\.01"):
        allocate_ranks(recipe, mobilenet, make_plan(mobilenet.module, recipe))


def test_a_ceiling_where_no_target_sets_the_rank_is_refused():
    with pytest.raises(SpecError, match=r"rules\[0\]\.maxError: only for factorising rules without a rank"):
        parse_job({"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "t"},
                   "spec": {"model": {"source": "zoo:minilm-l6"}, "recipe": {"rules": [{**REST, "rank": {"fixed": 8}, "maxError": 0.5}]}}})
