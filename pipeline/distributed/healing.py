"""Healing on Ray: one task, on a GPU when the cluster has one, streaming its progress to the driver.

The task is a Ray streaming generator: it yields (step, steps, loss) after each
optimizer step and the HealResult last, so the driver's progress bar and the
operator's status move while it trains, and only the trained values come back.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.distributed.session import RaySession
from pipeline.errors import KrunchError
from pipeline.heal import Batch, HealResult, StepCallback, healing
from pipeline.model import ModelKind
from pipeline.spec import Heal


def heal_resources(session: RaySession) -> dict[str, float]:
    """One GPU when the cluster has any (distillation is where a GPU pays most), else a whole node's CPUs."""
    if session.gpus >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": max(1.0, session.largest_node_cpus)}


def _heal_task(student: nn.Module, teacher: nn.Module, kind: ModelKind | None, batches: list[Batch], spec: Heal, threads: int):  # noqa: ANN202
    import ray

    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads)
    result = yield from healing(student, teacher, kind, batches, spec, device)
    yield result


def heal_on_ray(session: RaySession, student: nn.Module, teacher: nn.Module, kind: ModelKind | None, batches: list[Batch],
                spec: Heal, on_step: StepCallback | None = None) -> HealResult:  # fmt: skip
    import ray

    resources = heal_resources(session)
    threads = max(1, int(resources["num_cpus"]))
    remote = ray.remote(_heal_task).options(num_returns="streaming", max_retries=0, name="heal", **resources)
    result: HealResult | None = None
    for ref in remote.remote(student, teacher, kind, batches, spec, threads):
        try:
            item = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, KrunchError):  # bad input keeps its field and reason
                raise err.cause from None
            raise
        if isinstance(item, HealResult):
            result = item
        elif on_step:
            on_step(*item)
    assert result is not None, "the heal task ended without its result"
    return result
