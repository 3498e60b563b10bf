"""Healing on the real MiniLM: distillation lowers the held-out loss within a few steps, and only the
compressed layers' float factors and the norms move; the same through a Ray task, with streamed progress."""

from __future__ import annotations

import copy

import pytest
import torch

from krunch.assemble import assemble
from krunch.calibration.grams import calibration_batches, text_batches
from krunch.run import allocate_ranks, calibration_grams
from krunch.data.text import Split
from krunch.execution.executors import InProcessExecutor, RayExecutor
from krunch.execution.heal import distillation_loss, heal, model_output, trainable_names
from krunch.runtime.base import QuantizedTensor
from krunch.model import LoadedModel
from krunch.plan import make_plan
from krunch.spec import Calibration, CompressionJob, Heal, SpecError

pytestmark = pytest.mark.slow

# Feed-forward layers at rank 96 (float factors that can train), attention projections int8 (stored
# quantized: must not move), the attention output left alone (frozen).
RECIPE = {
    "rules": [
        {"match": "encoder.layer.*.intermediate.dense", "method": "svd", "rank": {"fixed": 96}},
        {"match": "encoder.layer.*.output.dense", "method": "svd", "rank": {"fixed": 96}},
        {"match": "encoder.layer.*.attention.self.*", "method": "none", "quantize": {"bits": 8}},
    ],
}
SPEC = Heal(steps=12, lr=3e-4, tokens=2048)


def compressed_copy(model: LoadedModel) -> LoadedModel:
    job = CompressionJob.model_validate({"apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "t"},
                                         "spec": {"model": {"source": model.reference}, "recipe": RECIPE}})  # fmt: skip
    plan = make_plan(model.module, job.spec.recipe)
    results = InProcessExecutor().run(model, plan, calibration_grams(job.spec.recipe, model, plan), allocate_ranks(job.spec.recipe, model, plan)).results
    module = copy.deepcopy(model.module)
    assemble(module, {r.name: r.module for r in results}, {})
    return LoadedModel("compressed", module, model.kind, model.tokenizer)


def held_out_loss(student: LoadedModel, teacher: LoadedModel) -> float:
    """Mean distillation loss on windows the healing never saw (the evaluation half of the text)."""
    losses = []
    with torch.no_grad():
        for _, kwargs in text_batches(teacher, "wikipedia", Split.EVALUATION, 2048):
            out, ref = (model_output(teacher.kind, m.module(**kwargs)) for m in (student, teacher))
            losses.append(float(distillation_loss(teacher.kind, out, ref)))
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def batches(minilm):
    return list(calibration_batches(minilm, Calibration(tokens=SPEC.tokens)))


def test_healing_lowers_the_held_out_loss_and_moves_only_factors_and_norms(minilm, batches):
    student = compressed_copy(minilm)
    teacher_before = {k: v.clone() for k, v in minilm.module.state_dict().items()}
    before = {k: v.clone() for k, v in student.module.state_dict().items()}
    names = set(trainable_names(student.module))
    flags = {n: p.requires_grad for n, p in student.module.named_parameters()}
    assert any(n.endswith(".coefficients") for n in names) and any("LayerNorm" in n for n in names)
    assert not any(".attention.self." in n for n in names)  # int8 factors are stored values, not parameters
    loss_before = held_out_loss(student, minilm)

    steps = []
    result = InProcessExecutor().heal(student, minilm, batches, SPEC, lambda *step: steps.append(step))

    assert [s[0] for s in steps] == list(range(1, SPEC.steps + 1)) and len(result.losses) == SPEC.steps
    loss_after = held_out_loss(student, minilm)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    after = student.module.state_dict()
    for key, value in after.items():
        if key in names:
            assert not torch.equal(value, before[key]), f"{key} should have trained"
        else:
            assert torch.equal(value, before[key]), f"{key} is frozen but changed"
    assert all(torch.equal(v, teacher_before[k]) for k, v in minilm.module.state_dict().items()), "the teacher changed"
    assert {n: p.requires_grad for n, p in student.module.named_parameters()} == flags  # left as found
    assert result.trainable == sum(before[n].numel() for n in names)
    assert any(isinstance(m, QuantizedTensor) for m in student.module.modules())


def test_healing_on_ray_streams_progress_and_returns_the_trained_factors(minilm, batches, ray_cluster):
    student = compressed_copy(minilm)
    before = {k: v.clone() for k, v in student.module.state_dict().items()}
    steps = []

    result = RayExecutor().heal(student, minilm, batches, SPEC, lambda *step: steps.append(step))

    assert [s[0] for s in steps] == list(range(1, SPEC.steps + 1))
    assert [s[2] for s in steps] == result.losses
    assert result.device == "cpu"
    after = student.module.state_dict()
    for name, value in result.state.items():  # the driver's copy holds what the task trained
        assert torch.equal(after[name], value) and not torch.equal(value, before[name]), name
    assert held_out_loss(student, minilm) < held_out_loss(compressed_copy(minilm), minilm)


def test_a_model_with_nothing_to_train_is_refused_naming_the_field(minilm, batches):
    linear_only = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(SpecError, match=r"spec\.recipe\.heal: nothing can train"):
        heal(linear_only, linear_only, minilm.kind, batches, SPEC)


def test_data_parallel_healing_through_ray_train_splits_batches_and_keeps_replicas_in_step(minilm, batches, ray_cluster):
    """Two DDP replicas (gloo on CPU): each step reads two batches, one per replica; the loss is their mean;
    the replicas end identical; the driver gets the trained values and the held-out loss drops."""
    student = compressed_copy(minilm)
    untrained = held_out_loss(student, minilm)
    with torch.no_grad():  # before any update every replica holds the same weights
        first = [float(distillation_loss(minilm.kind, model_output(minilm.kind, student.module(*a, **k)),
                                         model_output(minilm.kind, minilm.module(*a, **k)))) for a, k in batches[:2]]  # fmt: skip
    steps = []

    result = RayExecutor(heal_workers=2).heal(student, minilm, batches, SPEC, lambda *step: steps.append(step))

    assert result.workers == 2 and result.divergence == 0.0
    assert [s[0] for s in steps] == list(range(1, SPEC.steps + 1)) and [s[2] for s in steps] == result.losses
    assert result.losses[0] == pytest.approx(sum(first) / 2, rel=1e-4)  # replica r read batch r
    after = student.module.state_dict()
    assert all(torch.equal(after[name], value) for name, value in result.state.items())
    assert held_out_loss(student, minilm) < 0.8 * untrained


def test_more_heal_replicas_than_the_cluster_holds_are_refused_naming_the_field(minilm, batches, ray_cluster):
    with pytest.raises(SpecError, match=r"spec\.resources\.healWorkers: 64 replicas need a CPU each"):
        RayExecutor(heal_workers=64).heal(compressed_copy(minilm), minilm, batches, SPEC)
