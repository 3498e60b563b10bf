"""Run the per-layer stage: in this process, or as one Ray task per layer.

Both executors run the same `run_layer_task` at the same torch thread count,
so a job's factors are bit-identical whichever runs it and however many
workers there are. Ray adds what a cluster needs: a concurrency cap
(`resources.workers`), GPUs when asked for and present, retries of tasks whose
worker died, retries with a doubled memory request after running out of
memory, and an immediate failure naming the layer for deterministic errors.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tqdm import tqdm

from krunch.execution.layer import LayerResult
from krunch.execution.session import RaySession, ray_session
from krunch.execution.healing import heal_on_ray
from krunch.execution.tasks import (LayerHook, LayerTask, TensorSource, in_process_tasks, layer_weights, remote_tasks,
                                    run_layer_task, torch_threads, workers_see)  # fmt: skip
from krunch.errors import KrunchError
from krunch.execution.heal import Batch, HealResult, StepCallback, heal, load_healed
from krunch.model import LoadedModel
from krunch.plan import LayerPlan, Plan
from krunch.spec import Heal, Resources, SpecError

if TYPE_CHECKING:  # streaming.blocks imports calibration.propagate, which imports this module
    from krunch.streaming.blocks import BlockDone, BlockTask, Hidden

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]  # (layers done, total, layer name)
LayerWork = Callable[[LayerPlan, torch.Tensor], Any]  # a pure function of one layer's plan and weight
MIN_TASK_MEMORY = 256 * 2**20
TASK_MEMORY_PER_BYTE = 6  # working set of an SVD / TT-SVD in float64 relative to the fp32 weights
SUBMIT_AHEAD = 4  # tasks submitted per worker slot: enough to keep slots busy, few enough to bound Grams in flight


class LayerFailedError(RuntimeError):
    """A layer that could not be compressed; the message starts with the layer's name."""

    def __init__(self, layer: str, reason: str) -> None:
        self.layer = layer
        super().__init__(f"layer {layer}: {reason}")


@dataclass
class Execution:
    results: list[LayerResult]
    info: dict[str, Any] = field(default_factory=dict)  # for the report: mode, workers, device, retries...


class Executor(Protocol):
    def run(self, model: LoadedModel, plan: Plan, grams: dict[str, torch.Tensor], ranks: dict[str, int],
            progress: ProgressCallback | None = None, bar: bool = True) -> Execution: ...  # fmt: skip

    def heal(self, student: LoadedModel, teacher: LoadedModel, batches: list[Batch], spec: Heal,
             on_step: StepCallback | None = None) -> HealResult: ...  # fmt: skip

    def map_layers(self, work: LayerWork, model: LoadedModel, layers: list[LayerPlan], desc: str) -> list[Any]:
        """`work(layer, weight)` for each layer (e.g. the bytes budget's candidate tables), results in order."""
        ...

    def session(self) -> AbstractContextManager:
        """Held around many `run` calls (error propagation runs one per stage): connect once, not per call."""
        ...

    def run_blocks(self, tasks: list[BlockTask], first: Hidden, files: tuple[Path, ...]) -> Iterator[BlockDone]:
        """A streamed model's calibrated blocks in order (`streaming.blocks`), each block's hidden outputs the next
        one's inputs; each block's results as it finishes."""
        ...


class LayerProgress:
    """A per-layer bar (done / total, elapsed, ETA) plus the caller's callback, e.g. the operator's status."""

    def __init__(self, total: int, callback: ProgressCallback | None, show: bool = True) -> None:
        self.total, self.done, self.callback = total, 0, callback
        self.bar = tqdm(total=total, desc="compressing", unit="layer", disable=not show)

    def finished(self, name: str) -> None:
        self.done += 1
        self.bar.set_postfix_str(name, refresh=False)
        self.bar.update(1)
        if self.callback:
            self.callback(self.done, self.total, name)

    def close(self) -> None:
        self.bar.close()


def layer_failure(layer: str, err: BaseException) -> Exception:
    """Input errors keep their field path (and gain the layer); anything else becomes a LayerFailedError."""
    if isinstance(err, SpecError):
        return SpecError(err.subject, f"layer {layer}: {err.reason}")
    if isinstance(err, KrunchError):
        return type(err)(err.subject, f"layer {layer}: {err.reason}")
    return LayerFailedError(layer, f"{type(err).__name__}: {err}")


def fill_unchanged(model: LoadedModel, results: list[LayerResult]) -> list[LayerResult]:
    for result in results:
        if result.module is None:
            result.module = model.module.get_submodule(result.name)
    return results


@dataclass
class InProcessExecutor:
    """Layers one after another in this process: the reference the Ray path must match bit for bit."""

    threads: int = 1

    def run(self, model: LoadedModel, plan: Plan, grams: dict[str, torch.Tensor], ranks: dict[str, int],
            progress: ProgressCallback | None = None, bar: bool = True) -> Execution:  # fmt: skip
        tasks = in_process_tasks(model, plan, grams, ranks, self.threads)
        layers, results = LayerProgress(len(tasks), progress, bar), []
        try:
            for task in tasks:
                try:
                    results.append(run_layer_task(task))
                except Exception as err:
                    raise layer_failure(task.name, err) from err
                layers.finished(task.name)
        finally:
            layers.close()
        return Execution(fill_unchanged(model, results), {"mode": "inprocess", "threads": self.threads, "device": "cpu"})

    def session(self) -> AbstractContextManager:
        return nullcontext()

    def run_blocks(self, tasks: list[BlockTask], first: Hidden, files: tuple[Path, ...]) -> Iterator[BlockDone]:
        """Forwards at this process's threads, layers at `threads`: the whole-model job's arithmetic."""
        from krunch.streaming.blocks import run_in_order

        for done in run_in_order(tasks, first, self.threads):
            done.info = {**done.info, "mode": "inprocess", "threads": self.threads}
            yield done

    def map_layers(self, work: LayerWork, model: LoadedModel, layers: list[LayerPlan], desc: str) -> list[Any]:
        with torch_threads(self.threads):  # a streamed model's weights are read from its files one layer at a time
            return [work(layer, _tensor(weight)) for layer, weight in
                    zip(tqdm(layers, desc=desc, unit="layer", leave=False), layer_weights(model, layers, readable=lambda: True), strict=True)]  # fmt: skip

    def heal(self, student: LoadedModel, teacher: LoadedModel, batches: list[Batch], spec: Heal,
             on_step: StepCallback | None = None) -> HealResult:  # fmt: skip
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            return heal(student.module, teacher.module, teacher.kind, batches, spec, device, on_step)
        finally:  # the rest of the job (evaluation, saving) expects both where they were
            student.module.to("cpu")
            teacher.module.to("cpu")


@dataclass
class RayExecutor:
    """One Ray task per layer, at most `workers` running at once."""

    workers: int | None = None  # None: as many as the cluster's CPUs (and GPUs) allow
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    heal_workers: int = 1  # > 1: data-parallel healing through Ray Train
    address: str | None = None
    max_retries: int = 3  # a task whose worker process dies is rerun by Ray this many times
    oom_retries: int = 2  # then by us, each time asking for twice the memory
    reserve_timeout_s: float = 60.0  # to reserve the workers' CPUs/GPUs before giving up with resources.workers
    before_layer: LayerHook | None = None  # called in the worker with the layer's name first: where tests make workers fail
    _active: RaySession | None = field(default=None, init=False, repr=False, compare=False)  # inside `session()`

    @classmethod
    def from_resources(cls, resources: Resources, address: str | None = None) -> RayExecutor:
        return cls(workers=resources.workers, cpus_per_task=resources.cpus_per_task, gpus_per_task=resources.gpus_per_task,
                   heal_workers=resources.heal_workers, address=address)  # fmt: skip

    @property
    def threads(self) -> int:
        return max(1, math.floor(self.cpus_per_task))

    def run(self, model: LoadedModel, plan: Plan, grams: dict[str, torch.Tensor], ranks: dict[str, int],
            progress: ProgressCallback | None = None, bar: bool = True) -> Execution:  # fmt: skip
        with self.session() as session:
            gpus = self.usable_gpus(session)
            workers = self.worker_count(session, gpus)
            tasks, travel = remote_tasks(model, plan, grams, ranks, self.threads, session.source_seen_by)
            schedule = _Schedule(self, session, workers, gpus, LayerProgress(len(tasks), progress, bar))
            try:
                results = schedule.run(tasks)
            finally:
                schedule.bar.close()
        devices = sorted({r.device for r in results}) or ["cpu"]
        info = {"mode": "ray", "address": session.address, "nodes": session.nodes, "workers": workers,
                "cpus_per_task": self.cpus_per_task, "gpus_per_task": gpus, "threads_per_task": self.threads,
                "device": ",".join(devices), "tensors_read_by_workers": travel["file"],
                "tensors_via_object_store": travel["object_store"], "weights_from": travel["weights_from"],
                "source_seen_by": travel["source_seen_by"], "retries": schedule.retries}  # fmt: skip
        return Execution(fill_unchanged(model, results), info)

    @contextmanager
    def session(self) -> Iterator[RaySession]:
        """Connect (or start a local instance) once; `run`, `heal` and `map_layers` inside reuse it."""
        if self._active is not None:
            yield self._active
            return
        with ray_session(self.address) as session:
            self._active = session
            try:
                yield session
            finally:
                self._active = None

    def map_layers(self, work: LayerWork, model: LoadedModel, layers: list[LayerPlan], desc: str) -> list[Any]:
        """One Ray task per layer, weights through the object store, as many at once as the cluster's CPUs allow."""
        import ray

        with self.session() as session:
            remote = ray.remote(_ray_layer_work).options(num_cpus=self.cpus_per_task, max_retries=self.max_retries)
            weights = layer_weights(model, layers, readable=lambda: workers_see(model.weight_files, session.source_seen_by)[0])
            refs = [remote.remote(work, layer, weight, self.threads) for layer, weight in zip(layers, weights, strict=True)]
            results = []
            for layer, ref in zip(tqdm(layers, desc=desc, unit="layer", leave=False), refs, strict=True):
                try:
                    results.append(ray.get(ref))
                except ray.exceptions.RayTaskError as err:
                    for pending in refs:
                        ray.cancel(pending, force=True)
                    raise layer_failure(layer.name, err.cause or err) from None
            return results

    def run_blocks(self, tasks: list[BlockTask], first: Hidden, files: tuple[Path, ...]) -> Iterator[BlockDone]:
        """One Ray task per block, in order, each taking the CPUs of all the workers (blocks cannot overlap: each needs
        the one before's outputs, which go from task to task as object references, never through this process)."""
        import ray

        from krunch.streaming.blocks import staged_in_object_store

        with self.session() as session:
            readable, seen_by = workers_see(files, session.source_seen_by)
            width = max(1, math.floor(min(self.worker_count(session, 0.0) * self.cpus_per_task, session.largest_node_cpus or math.inf)))
            remote = ray.remote(_ray_block_task)
            options = {"num_cpus": width, "num_returns": 3, "max_retries": self.max_retries, "retry_exceptions": False}
            hidden: Any = ray.put(first)
            working: Any = hidden if tasks and tasks[0].propagate else None
            pending: deque[tuple[str, Any]] = deque()
            info = {"mode": "ray", "address": session.address, "nodes": session.nodes, "block_cpus": width, "threads_per_task": width,
                    "weights_from": "source files" if readable else "object store", "source_seen_by": seen_by}  # fmt: skip
            try:
                for task in tasks:
                    shipped = task if readable else staged_in_object_store(task)
                    done, hidden, working = remote.options(**options, name=f"compress:{task.name}").remote(shipped, hidden, working, width)
                    pending.append((task.name, done))
                    if len(pending) > 1:  # one block ahead: its tensors and calls are in the object store, no more
                        yield self._block_done(*pending.popleft(), info)
                while pending:
                    yield self._block_done(*pending.popleft(), info)
            finally:
                for _, ref in pending:
                    ray.cancel(ref, force=True)

    @staticmethod
    def _block_done(name: str, ref: Any, info: dict[str, Any]) -> BlockDone:
        import ray

        try:
            done = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            raise layer_failure(name, err.cause or err) from None
        except ray.exceptions.RayError as err:
            raise LayerFailedError(name, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
        done.info = {**done.info, **info}
        return done

    def heal(self, student: LoadedModel, teacher: LoadedModel, batches: list[Batch], spec: Heal,
             on_step: StepCallback | None = None) -> HealResult:  # fmt: skip
        """One Ray task (a GPU when the cluster has one), or `heal_workers` Ray Train replicas; the trained values
        are loaded into `student` here."""
        with self.session() as session:
            result = heal_on_ray(session, student.module, teacher.module, teacher.kind, batches, spec, on_step, self.heal_workers)
        load_healed(student.module, result.state)
        return result

    def worker_count(self, session: RaySession, gpus: float) -> int:
        if self.workers is not None:
            return self.workers
        fits = math.floor(session.cpus / self.cpus_per_task)
        if gpus:
            fits = min(fits, math.floor(session.gpus / gpus))
        return max(1, fits)

    def usable_gpus(self, session: RaySession) -> float:
        if self.gpus_per_task <= 0:
            return 0.0
        if session.gpus == 0:
            logging.getLogger("krunch").warning("resources.gpusPerTask is %g but the Ray cluster has no GPUs: layer tasks run on CPU", self.gpus_per_task)
            return 0.0
        if self.gpus_per_task > session.largest_node_gpus:
            raise SpecError("resources.gpusPerTask", f"{self.gpus_per_task} exceeds the {session.largest_node_gpus:g} GPUs "
                            "of the largest node, so no task could ever be scheduled")  # fmt: skip
        return self.gpus_per_task


class _Schedule:
    """The submit / wait / retry loop of one run; bounded by the task count and the retry limits.

    Concurrency is capped by a placement group of `workers` bundles, not by the
    driver: tasks queue inside Ray, which starts the next one the moment a bundle
    frees, with no round trip through this loop. Submission runs a few tasks
    ahead of the bundles so that calibration Grams enter the object store a
    window at a time rather than all at once.
    """

    def __init__(self, executor: RayExecutor, session: RaySession, workers: int, gpus: float, bar: LayerProgress) -> None:
        import ray

        self.ray, self.executor, self.session, self.bar = ray, executor, session, bar
        self.workers, self.gpus = workers, gpus
        self.remote = ray.remote(_ray_layer_task)
        self.retries: dict[str, list[dict[str, Any]]] = {}

    def memory_for(self, tasks: list[LayerTask]) -> int:
        """One request for every task: one scheduling class, so Ray reuses leased workers between tasks."""
        wanted = max([MIN_TASK_MEMORY] + [TASK_MEMORY_PER_BYTE * (task.weight_bytes + task.gram_bytes) for task in tasks])
        return int(min(wanted, self.session.largest_node_memory or wanted))

    def bundle_memory(self, memory: int) -> int:
        """Room in each worker's reservation for the out-of-memory retries' doubled requests, within the node."""
        node = int(self.session.largest_node_memory / self.workers) if self.session.largest_node_memory else memory
        return max(memory, min(memory * 2**self.executor.oom_retries, node))

    def reserve(self, memory: int) -> Any:
        from ray.util.placement_group import placement_group

        bundle = {"CPU": self.executor.cpus_per_task, "memory": self.bundle_memory(memory)} | ({"GPU": self.gpus} if self.gpus else {})
        group = placement_group([bundle] * self.workers, strategy="PACK", name="krunch-layer-workers")
        ready, _ = self.ray.wait([group.ready()], timeout=self.executor.reserve_timeout_s)
        if not ready:
            self.ray.util.remove_placement_group(group)
            raise SpecError("resources.workers", f"the Ray cluster cannot hold {self.workers} workers of {bundle} at once "
                            f"(it has {self.session.cpus:g} CPUs, {self.session.gpus:g} GPUs); ask for fewer")  # fmt: skip
        return group

    def submit(self, task: LayerTask, memory: int, group: Any) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options = {"num_cpus": self.executor.cpus_per_task, "num_gpus": self.gpus, "memory": memory,
                   "max_retries": self.executor.max_retries, "retry_exceptions": False, "name": f"compress:{task.name}",
                   "scheduling_strategy": PlacementGroupSchedulingStrategy(group)}  # fmt: skip
        return self.remote.options(**options).remote(task, self.executor.before_layer)

    def run(self, tasks: list[LayerTask]) -> list[LayerResult]:
        from ray.exceptions import OutOfMemoryError, RayError, RayTaskError

        memory = self.memory_for(tasks)
        group, group_memory = self.reserve(memory), self.bundle_memory(memory)
        waiting = deque((task, memory, 0) for task in tasks)
        in_flight: dict[Any, tuple[LayerTask, int, int]] = {}
        results: dict[str, LayerResult] = {}
        try:
            while waiting or in_flight:
                while waiting and len(in_flight) < self.workers * SUBMIT_AHEAD:
                    task, task_memory, ooms = waiting.popleft()
                    in_flight[self.submit(task, task_memory, group)] = (task, task_memory, ooms)
                (ref,), _ = self.ray.wait(list(in_flight), num_returns=1)
                task, task_memory, ooms = in_flight.pop(ref)
                try:
                    results[task.name] = self.ray.get(ref)
                except (OutOfMemoryError, RayTaskError) as err:
                    cause = err.cause if isinstance(err, RayTaskError) else err
                    if not _is_out_of_memory(err, cause):
                        raise layer_failure(task.name, cause) from None
                    waiting.appendleft((task, self.more_memory(task, task_memory, ooms, err, group_memory), ooms + 1))
                    continue
                except RayError as err:  # the worker died more often than max_retries allows
                    raise LayerFailedError(task.name, f"{type(err).__name__} after {self.executor.max_retries} retries: "
                                           f"{str(err).splitlines()[0] if str(err) else ''}") from None  # fmt: skip
                self.bar.finished(task.name)
        finally:
            for ref in in_flight:
                self.ray.cancel(ref, force=True)
            self.ray.util.remove_placement_group(group)
        return [results[task.name] for task in tasks]

    def more_memory(self, task: LayerTask, memory: int, ooms: int, err: BaseException, cap: int) -> int:
        if ooms >= self.executor.oom_retries or memory >= cap:
            raise LayerFailedError(task.name, f"out of memory with {memory / 2**30:.2f} GiB requested, "
                                   f"{ooms} retries: {str(err).splitlines()[0]}")  # fmt: skip
        bigger = min(memory * 2, cap)
        self.retries.setdefault(task.name, []).append({"reason": "out_of_memory", "memory_before": memory, "memory_after": bigger})
        log.warning("%s ran out of memory; retrying with %.2f GiB", task.name, bigger / 2**30)
        return bigger


def _is_out_of_memory(err: BaseException, cause: BaseException | None) -> bool:
    from ray.exceptions import OutOfMemoryError

    return isinstance(err, OutOfMemoryError) or isinstance(cause, (MemoryError, torch.OutOfMemoryError))


def _ray_layer_work(work: LayerWork, layer: LayerPlan, weight: torch.Tensor | TensorSource, threads: int) -> Any:
    with torch_threads(threads):
        return work(layer, _tensor(weight))


def _tensor(weight: torch.Tensor | TensorSource) -> torch.Tensor:
    return weight if isinstance(weight, torch.Tensor) else weight.read()


def _ray_layer_task(task: LayerTask, before_layer: LayerHook | None) -> LayerResult:
    """Runs in a Ray worker: CUDA when Ray assigned this task a GPU, the assigned CPUs as torch threads."""
    import ray

    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    result = run_layer_task(task, device, before_layer)
    result.resources = dict(ray.get_runtime_context().get_assigned_resources())
    return result


def _ray_block_task(task: BlockTask, hidden: Hidden, working: Hidden | None, threads: int) -> tuple[BlockDone, Hidden, Hidden | None]:
    """Runs in a Ray worker: the whole block, forwards and layers, at the task's CPUs as torch threads."""
    from krunch.streaming.blocks import run_block_task

    with torch_threads(threads):
        return run_block_task(task, hidden, working, threads)
