"""target.bytesRatio: the joint size budget over dense / factorised and fp32 / int8 / int4, on real weights."""

from __future__ import annotations

import pytest

from krunch.run import allocate_target
from krunch.execution.layer import compress_layer
from krunch.plan.size_budget import Candidate, pareto_front
from krunch.sizes import bytes_without_bias
from krunch.spec import CompressionJob, QuantizeConfig, SpecError, parse_job


def job(target: dict, rules: list[dict] | None = None, source: str = "zoo:minilm-l6") -> CompressionJob:
    return parse_job({"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "t"},
                      "spec": {"model": {"source": source},
                               "recipe": {"target": target, "rules": rules or [{"match": "encoder.layer.*", "method": "svd"}]}}})  # fmt: skip


def test_target_takes_exactly_one_ratio():
    for target in ({"paramRatio": 0.5, "bytesRatio": 0.2}, {}):
        with pytest.raises(SpecError, match="spec.recipe.target.*exactly one of paramRatio and bytesRatio"):
            job(target)


def test_pareto_front_offers_nothing_larger_than_the_dense_weight_and_nothing_dominated():
    int8 = QuantizeConfig(bits=8)
    candidates = [Candidate(None, None, 400, 0.0), Candidate(None, int8, 104, 0.01), Candidate(50, None, 400, 0.2),
                  Candidate(10, None, 80, 0.3), Candidate(20, int8, 50, 0.25), Candidate(12, int8, 90, 0.5)]  # fmt: skip
    front = pareto_front(candidates, dense_bytes=400)
    assert [(c.rank, c.bytes) for c in front] == [(20, 50), (None, 104), (None, 400)]


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.3, 0.2, 0.12])
def test_budget_is_met_within_one_percent_and_the_planned_bytes_are_the_built_bytes(minilm, ratio):
    """MiniLM's 36 encoder linears: the plan fits the bytes, spends at least 99% of them, never makes a layer
    bigger than its dense weight, and the built layers store exactly the bytes the planner counted."""
    allocation = allocate_target(job({"bytesRatio": ratio}).spec.recipe, minilm, _plan(minilm))
    budget = allocation.budget
    assert budget is not None and len(budget["choices"]) == 36
    assert 0.99 * budget["budget_bytes"] <= budget["planned_bytes"] <= budget["budget_bytes"]
    dense = {table["name"]: table["dense_bytes"] for table in budget["tables"]}
    for name, choice in budget["choices"].items():
        assert choice["bytes"] < dense[name] or choice["choice"] == "dense fp32", (name, choice)
    built = 0
    for layer in allocation.plan.layers:
        module = minilm.module.get_submodule(layer.name)
        result = compress_layer(layer, module, None, allocation.ranks.get(layer.name))
        built += bytes_without_bias(result.module)
    assert built == budget["planned_bytes"]


@pytest.mark.slow
def test_smaller_budgets_never_lower_the_error_and_use_cheaper_storage(minilm):
    plan = _plan(minilm)
    errors, kinds = [], []
    for ratio in (0.3, 0.2, 0.12, 0.08):
        budget = allocate_target(job({"bytesRatio": ratio}).spec.recipe, minilm, plan).budget
        errors.append(sum(choice["error"] for choice in budget["choices"].values()))
        kinds.append({choice["kind"] for choice in budget["choices"].values()})
    assert errors == sorted(errors) and errors[0] < errors[-1]
    assert "dense int8" in kinds[0] and any(kind.startswith("factorised") for kind in kinds[-1]), kinds  # 0.08: below dense int4


@pytest.mark.slow
def test_a_budget_below_every_layers_smallest_candidate_names_the_field(minilm):
    with pytest.raises(SpecError, match="spec.recipe.target.bytesRatio.*below the smallest possible"):
        allocate_target(job({"bytesRatio": 0.001}).spec.recipe, minilm, _plan(minilm))


def _plan(model):
    from krunch.plan import make_plan

    return make_plan(model.module, job({"bytesRatio": 0.5}).spec.recipe)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_candidate_tables_computed_as_ray_tasks_equal_the_in_process_ones(minilm):
    from krunch.execution.executors import RayExecutor

    plan = _plan(minilm)
    local = allocate_target(job({"bytesRatio": 0.2}).spec.recipe, minilm, plan).budget
    remote = allocate_target(job({"bytesRatio": 0.2}).spec.recipe, minilm, plan, RayExecutor()).budget
    assert remote["tables"] == local["tables"] and remote["choices"] == local["choices"]


def test_widths_are_only_for_a_bytes_budget_and_each_given_once():
    with pytest.raises(SpecError, match="spec.recipe.target.*bits: the widths a bytesRatio budget"):
        job({"paramRatio": 0.5, "bits": [8, 4, 3]})
    with pytest.raises(SpecError, match="spec.recipe.target.*bits: each width once"):
        job({"bytesRatio": 0.2, "bits": [4, 4]})
    with pytest.raises(SpecError, match="spec.recipe.target.bits"):
        job({"bytesRatio": 0.2, "bits": [5]})
    assert job({"bytesRatio": 0.2}).spec.recipe.target.bits == [8, 4]


@pytest.mark.slow
def test_narrower_widths_on_offer_lower_the_error_at_three_bits_a_weight_and_build_to_the_planned_bytes(minilm):
    """At 0.09 of the fp32 bytes (about 2.9 bits a weight) int8/int4 alone must factorise layers; with int3 and
    int2 on offer the budget stores some layers narrower instead, at a lower summed error, and the built
    int3/int2 layers store exactly the bytes it counted."""
    plan = _plan(minilm)
    default = allocate_target(job({"bytesRatio": 0.09}).spec.recipe, minilm, plan).budget
    narrow_allocation = allocate_target(job({"bytesRatio": 0.09, "bits": [8, 4, 3, 2]}).spec.recipe, minilm, plan)
    narrow = narrow_allocation.budget
    storages = {choice["choice"].split(" ")[-1].split("/")[0] for choice in narrow["choices"].values()}
    assert storages & {"int3", "int2"}, storages
    assert not any("int3" in c["choice"] or "int2" in c["choice"] for c in default["choices"].values())
    error = {name: sum(choice["error"] for choice in b["choices"].values()) for name, b in (("default", default), ("narrow", narrow))}
    assert error["narrow"] < error["default"], error
    assert narrow["planned_bytes"] <= narrow["budget_bytes"]
    built = 0
    for layer in narrow_allocation.plan.layers:
        result = compress_layer(layer, minilm.module.get_submodule(layer.name), None, narrow_allocation.ranks.get(layer.name))
        built += bytes_without_bias(result.module)
    assert built == narrow["planned_bytes"]
