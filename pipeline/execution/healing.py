"""Healing on Ray: one task, or data-parallel replicas through Ray Train, streaming progress to the driver.

A single replica is a Ray streaming generator task: it yields (step, steps,
loss) after each optimizer step and the HealResult last, so the driver's
progress bar and the operator's status move while it trains, and only the
trained values come back. With resources.healWorkers > 1, Ray Train's
TorchTrainer runs that many replicas under DistributedDataParallel (one GPU
each, or a share of the CPUs over gloo); replica 0 streams the same items
through a Ray queue.
"""

from __future__ import annotations

import math
import tempfile
import threading
from typing import Any

import torch
from torch import nn

from krunch.execution.session import RaySession
from krunch.errors import KrunchError
from krunch.execution.heal import Batch, HealResult, Replica, StepCallback, check_healable, healing
from krunch.model import ModelKind
from krunch.spec import Heal, SpecError

WORKERS_FIELD = "spec.resources.healWorkers"
POLL_S = 1.0  # how often the driver looks for progress while Ray Train runs


def heal_resources(session: RaySession) -> dict[str, float]:
    """One GPU when the cluster has any (distillation is where a GPU pays most), else a whole node's CPUs."""
    if session.gpus >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_gpus": 0, "num_cpus": max(1.0, session.largest_node_cpus)}


def replica_resources(session: RaySession, workers: int) -> tuple[bool, dict[str, float]]:
    """(use GPUs, resources per replica): a GPU each when the cluster has GPUs, else an equal share of the CPUs."""
    if session.gpus >= 1:
        if session.gpus < workers:
            raise SpecError(WORKERS_FIELD, f"{workers} replicas need a GPU each, but the Ray cluster has {session.gpus:g}")
        return True, {"GPU": 1, "CPU": 1}
    if session.cpus < workers:
        raise SpecError(WORKERS_FIELD, f"{workers} replicas need a CPU each, but the Ray cluster has {session.cpus:g}")
    return False, {"CPU": max(1, math.floor(session.cpus / workers))}


def _heal_task(student: nn.Module, teacher: nn.Module, kind: ModelKind | None, batches: list[Batch], spec: Heal, threads: int):  # noqa: ANN202
    import ray

    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads)
    result = yield from healing(student, teacher, kind, batches, spec, device)
    yield result


def heal_on_ray(session: RaySession, student: nn.Module, teacher: nn.Module, kind: ModelKind | None, batches: list[Batch],
                spec: Heal, on_step: StepCallback | None = None, workers: int = 1) -> HealResult:  # fmt: skip
    import ray

    check_healable(student, kind)
    if workers > 1:
        return heal_with_ray_train(session, student, teacher, kind, batches, spec, workers, on_step)
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
        result = _deliver(item, on_step) or result
    assert result is not None, "the heal task ended without its result"
    return result


def _deliver(item: Any, on_step: StepCallback | None) -> HealResult | None:
    if isinstance(item, HealResult):
        return item
    if on_step:
        on_step(*item)
    return None


def _replica_loop(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: its own copy of the student, wrapped in DDP by Ray Train."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    torch.set_num_threads(config["threads"])
    student, teacher, batches = ray.get([config["student"], config["teacher"], config["batches"]])
    wrap = lambda module: ray.train.torch.prepare_model(module, move_to_device=False)  # noqa: E731 - healing moved it
    replica = Replica(context.get_world_rank(), context.get_world_size(), wrap)
    device = ray.train.torch.get_device()
    steps = healing(student, teacher, config["kind"], batches, config["spec"], str(device), replica)
    while True:
        try:
            step = next(steps)
        except StopIteration as finished:
            result: HealResult = finished.value
            result.divergence = _divergence(result.state, device)  # every replica takes part in the all-reduce
            if replica.rank == 0:
                config["progress"].put(result)
            return
        if replica.rank == 0:
            config["progress"].put(step)


def _divergence(state: dict[str, torch.Tensor], device: torch.device) -> float:
    """max |a - b| over the replicas' trained values: a check that DDP really kept them in step."""
    values = torch.cat([value.flatten().double() for value in state.values()]).to(device)
    high, low = values.clone(), values.clone()
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    return float((high - low).max())


def heal_with_ray_train(session: RaySession, student: nn.Module, teacher: nn.Module, kind: ModelKind | None,
                        batches: list[Batch], spec: Heal, workers: int, on_step: StepCallback | None) -> HealResult:  # fmt: skip
    """`workers` replicas under Ray Train (TorchTrainer, DDP); each step reads `workers` batches in parallel."""
    import ray
    from ray.util.queue import Queue

    use_gpu, per_replica = replica_resources(session, workers)
    progress = Queue()
    config = {"student": ray.put(student), "teacher": ray.put(teacher), "batches": ray.put(batches), "kind": kind,
              "spec": spec, "progress": progress, "threads": int(per_replica["CPU"])}  # fmt: skip
    try:
        result, failure = _fit_streaming(config, workers, use_gpu, per_replica, on_step)
    finally:
        ray.kill(progress.actor)
    if failure:
        raise failure[0]
    assert result is not None, "Ray Train finished without the healed values"
    return result


def _fit_streaming(config: dict[str, Any], workers: int, use_gpu: bool, per_replica: dict[str, float],
                   on_step: StepCallback | None) -> tuple[HealResult | None, list[BaseException]]:  # fmt: skip
    """Run the trainer in a thread and deliver what replica 0 streams until the result arrives or training ends."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty

    progress = config["progress"]
    failure: list[BaseException] = []
    result: HealResult | None = None
    with tempfile.TemporaryDirectory(prefix="krunch-heal-") as storage:
        trainer = TorchTrainer(
            _replica_loop, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_replica),
            run_config=RunConfig(name="krunch-heal", storage_path=storage, failure_config=FailureConfig(max_failures=0)),
        )  # fmt: skip

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as err:  # noqa: BLE001 - re-raised on the driver's thread below
                failure.append(err)

        thread = threading.Thread(target=fit, name="krunch-heal-fit", daemon=True)
        thread.start()
        while result is None and (thread.is_alive() or not progress.empty()):
            try:
                result = _deliver(progress.get(timeout=POLL_S), on_step)
            except Empty:
                continue
        thread.join()
    return result, failure
