"""Layer tasks on a real Ray cluster (a head on 127.0.0.2 started by the `ray_cluster` fixture, not local_mode).

The reference for every check is the in-process executor on the same real
model: Ray must give the same factors bit for bit, through retries and at any
worker count.
"""

from __future__ import annotations

import pytest
import ray.cloudpickle
import torch

from krunch.run import allocate_ranks, calibration_grams
from krunch.execution.executors import Execution, InProcessExecutor, LayerFailedError, RayExecutor
from krunch.plan import make_plan
from krunch.spec import SpecError
from tests.pipeline.execution import faults
from tests.pipeline.execution.faults import FaultInjection

ray.cloudpickle.register_pickle_by_value(faults)  # the workers unpickle the hook without importing the tests

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

# Every kind of work MiniLM offers: activation-aware SVD (Grams travel with the task), TT by error bound,
# SVD by energy, int8 everywhere, and a matched layer left dense but quantized.
MINILM_RECIPE = {
    "rules": [
        {"match": "encoder.layer.*.attention.self.*", "method": "svd", "activationAware": True, "rank": {"fixed": 48}},
        {"match": "encoder.layer.*.intermediate.dense", "method": "tt", "rank": {"maxError": 0.5}},
        {"match": "encoder.layer.?.output.dense", "method": "svd", "rank": {"energy": 0.8}},
        {"match": "encoder.layer.*.attention.output.dense", "method": "none"},
    ],
    "quantize": {"bits": 8},
    "calibration": {"data": "wikipedia", "tokens": 1024},
}
EASYOCR_RECIPE = {"rules": [{"match": f"FeatureExtraction.ConvNet.{index}", "method": "tucker", "rank": {"fixed": 24}}
                            for index in ("[368]", "1[14]")]}  # fmt: skip


def stage_inputs(model, recipe: dict):
    from krunch.spec import CompressionJob

    job = CompressionJob.model_validate({"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "t"},
                                         "spec": {"model": {"source": model.reference}, "recipe": recipe}})  # fmt: skip
    plan = make_plan(model.module, job.spec.recipe)
    return plan, calibration_grams(job.spec.recipe, model, plan), allocate_ranks(job.spec.recipe, model, plan)


def assert_identical(a: Execution, b: Execution) -> None:
    assert [r.name for r in a.results] == [r.name for r in b.results]
    for left, right in zip(a.results, b.results, strict=True):
        assert type(left.module) is type(right.module), left.name
        ls, rs = left.module.state_dict(), right.module.state_dict()
        assert ls.keys() == rs.keys(), left.name
        for key in ls:
            assert torch.equal(ls[key], rs[key]), f"{left.name}.{key} differs"
        assert left.rank == right.rank and left.rel_error == right.rel_error


@pytest.fixture(scope="module")
def minilm_stage(minilm):
    return stage_inputs(minilm, MINILM_RECIPE)


@pytest.fixture(scope="module")
def minilm_reference(minilm, minilm_stage) -> Execution:
    return InProcessExecutor().run(minilm, *minilm_stage)


def test_ray_factors_equal_in_process_bitwise_at_one_and_two_workers(minilm, minilm_stage, minilm_reference):
    methods = {r.method for r in minilm_reference.results}
    assert methods == {"svd", "tt", "none"} and len(minilm_reference.results) == 36
    seen: list[tuple[int, int, str]] = []
    one = RayExecutor(workers=1).run(minilm, *minilm_stage, progress=lambda done, total, name: seen.append((done, total, name)))
    two = RayExecutor(workers=2).run(minilm, *minilm_stage)
    assert_identical(minilm_reference, one)
    assert_identical(minilm_reference, two)

    assert [done for done, _, _ in seen] == list(range(1, 37)) and {total for _, total, _ in seen} == {36}
    assert sorted(name for _, _, name in seen) == sorted(r.name for r in minilm_reference.results)
    # MiniLM came from a safetensors file: workers read their own tensors, nothing went through the object store
    assert two.info["tensors_read_by_workers"] == 72 and two.info["tensors_via_object_store"] == 0
    assert two.info["weights_from"] == "source files" and list(two.info["source_seen_by"].values()) == [True]
    assert two.info["device"] == "cpu" and {r.threads for r in two.results} == {1}
    assert all(r.resources["CPU"] == 1.0 for r in two.results)


def test_object_store_path_and_seeded_tucker_are_deterministic(easyocr):
    stage = stage_inputs(easyocr, EASYOCR_RECIPE)
    reference = InProcessExecutor().run(easyocr, *stage)
    remote = RayExecutor(workers=2).run(easyocr, *stage)
    assert {r.method for r in reference.results} == {"tucker"} and len(reference.results) == 5
    assert_identical(reference, remote)
    assert remote.info["tensors_via_object_store"] == 8 and remote.info["tensors_read_by_workers"] == 0  # a .pth source


def test_workers_default_to_the_cluster_and_more_than_it_holds_is_refused(easyocr):
    stage = stage_inputs(easyocr, EASYOCR_RECIPE)
    assert RayExecutor().run(easyocr, *stage).info["workers"] == 2  # the fixture's head has 2 CPUs
    with pytest.raises(SpecError, match=r"^resources\.workers: the Ray cluster cannot hold 3 workers"):
        RayExecutor(workers=3, reserve_timeout_s=3).run(easyocr, *stage)


def test_threads_follow_the_cpus_ray_assigns(minilm, minilm_stage):
    executor = RayExecutor(workers=1, cpus_per_task=2)
    execution = executor.run(minilm, *minilm_stage)
    assert {r.threads for r in execution.results} == {2}
    assert all(r.resources["CPU"] == 2.0 for r in execution.results)


def test_a_killed_worker_is_retried_and_the_result_is_unchanged(minilm, minilm_stage, minilm_reference, tmp_path):
    layer = "encoder.layer.3.intermediate.dense"
    fault = FaultInjection(layer, "kill", str(tmp_path / "killed"))
    execution = RayExecutor(workers=2, before_layer=fault).run(minilm, *minilm_stage)
    assert fault.attempts() == 2  # the first attempt's process died; Ray ran it again
    assert_identical(minilm_reference, execution)


def test_out_of_memory_is_retried_with_twice_the_memory(minilm, minilm_stage, minilm_reference, tmp_path):
    layer = "encoder.layer.1.attention.self.query"
    fault = FaultInjection(layer, "oom", str(tmp_path / "oom"))
    execution = RayExecutor(workers=2, before_layer=fault).run(minilm, *minilm_stage)
    assert fault.attempts() == 2
    (retry,) = execution.info["retries"][layer]
    assert retry["reason"] == "out_of_memory" and retry["memory_after"] == 2 * retry["memory_before"]
    retried = next(r for r in execution.results if r.name == layer)
    assert retried.resources["memory"] == retry["memory_after"]  # the successful attempt ran with the bigger request
    assert_identical(minilm_reference, execution)


def test_a_deterministic_layer_error_fails_at_once_naming_the_layer(minilm, tmp_path):
    recipe = {"rules": [{"match": "encoder.layer.2.intermediate.dense", "method": "svd", "rank": {"energy": 0.99999}}]}
    stage = stage_inputs(minilm, recipe)
    fault = FaultInjection("encoder.layer.2.intermediate.dense", "none", str(tmp_path / "count"))
    with pytest.raises(SpecError) as raised:
        RayExecutor(workers=2, before_layer=fault).run(minilm, *stage)
    assert "layer encoder.layer.2.intermediate.dense" in str(raised.value)
    assert raised.value.subject == "spec.recipe.rules[0].rank.energy"
    assert fault.attempts() == 1  # not retried


def test_other_layer_errors_name_the_layer(minilm):
    plan, grams, ranks = stage_inputs(minilm, {"rules": [{"match": "encoder.layer.0.output.dense", "method": "svd",
                                                         "activationAware": True, "rank": {"fixed": 8}}],
                                               "calibration": {"data": "wikipedia", "tokens": 256}})  # fmt: skip
    with pytest.raises(LayerFailedError, match=r"^layer encoder\.layer\.0\.output\.dense: ValueError: .*calibration"):
        RayExecutor().run(minilm, plan, {}, ranks)  # the Grams are missing


def test_gpus_requested_on_a_cpu_only_cluster_run_on_cpu_and_say_so(easyocr, caplog):
    stage = stage_inputs(easyocr, EASYOCR_RECIPE)
    with caplog.at_level("WARNING", logger="krunch"):
        execution = RayExecutor(workers=2, gpus_per_task=0.5).run(easyocr, *stage)
    assert execution.info["gpus_per_task"] == 0 and execution.info["device"] == "cpu"
    assert "but the Ray cluster has no GPUs: layer tasks run on CPU" in caplog.text
