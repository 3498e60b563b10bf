"""The unit of distributed work: one layer's compression, packaged so that a worker can run it alone.

A `LayerTask` carries the layer's plan, a weightless copy of the source module
(parameters on the `meta` device), where each of its tensors can be read, the
calibration Gram matrix and the allocated rank. Tensors are read by the worker
itself from the source safetensors files when the model came from them and every
node of the cluster sees those files (asked of each node before any task runs);
otherwise the driver `ray.put`s them, once. Either way the weights cross the
driver at most once.

`run_layer_task` is the same code in process and in a Ray worker, at the same
torch thread count, so the factors are bit-identical wherever a layer runs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from krunch.execution.layer import LayerResult, compress_layer
from krunch.model import LoadedModel
from krunch.plan import LayerPlan, Plan
from krunch.streaming.store import TensorStore


@dataclass(frozen=True)
class FileTensor:
    """A tensor the worker reads straight from a safetensors file (one tensor, not the whole file)."""

    path: str
    key: str

    def read(self) -> torch.Tensor:
        with safe_open(self.path, framework="pt", device="cpu") as handle:
            return handle.get_tensor(self.key)


@dataclass(frozen=True)
class StoredTensor:
    """A tensor the driver put into Ray's object store once (sources that are not safetensors)."""

    ref: Any  # ray.ObjectRef

    def read(self) -> torch.Tensor:
        import ray

        return ray.get(self.ref)


TensorSource = FileTensor | StoredTensor
LayerHook = Callable[[str], None]  # called with a layer's name in the worker before its task runs


@dataclass
class LayerTask:
    plan: LayerPlan
    module: nn.Module  # the real module in process; a meta-device shell when `tensors` says where its data is
    gram: torch.Tensor | None
    allocated: int | None
    threads: int
    tensors: dict[str, TensorSource] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def weight_bytes(self) -> int:
        return sum(math.prod(p.shape) * p.element_size() for p in self.module.parameters())

    @property
    def gram_bytes(self) -> int:
        return 0 if self.gram is None else self.gram.numel() * self.gram.element_size()


def work_layers(plan: Plan) -> list[LayerPlan]:
    """Layers that need work of their own: tied layers reuse their owner's result."""
    return [layer for layer in plan.layers if layer.tied_to is None]


def located(store: TensorStore, key: str, shape: tuple[int, ...]) -> FileTensor | None:
    """The file tensor `key` of that shape, or None where the files hold no such tensor."""
    if key not in store or store.shape(key) != shape:
        return None
    return FileTensor(store.path_of(key), key)


def in_process_tasks(model: LoadedModel, plan: Plan, grams: dict[str, torch.Tensor], ranks: dict[str, int],
                     threads: int) -> list[LayerTask]:  # fmt: skip
    """The real modules; a streamed model's (parameters on the meta device) as shells reading their files."""
    store = None  # read from the files' headers only for a streamed model
    tasks = []
    for layer in work_layers(plan):
        module = model.module.get_submodule(layer.name)
        task = LayerTask(layer, module, grams.get(layer.name), ranks.get(layer.name), threads)
        if model.weight_files and any(p.is_meta for p in module.parameters()):
            store = store or TensorStore(model.weight_files)
            task.module = weightless_copy(module)
            task.tensors = {name: _file_tensor(store, f"{layer.name}.{name}", p) for name, p in module.named_parameters()}
        tasks.append(task)
    return tasks


def _file_tensor(store: TensorStore, key: str, parameter: torch.Tensor) -> FileTensor:
    found = located(store, key, tuple(parameter.shape))
    if found is None:
        raise KeyError(f"{key}: no tensor of shape {tuple(parameter.shape)} in the weight files")
    return found


def remote_tasks(model: LoadedModel, plan: Plan, grams: dict[str, torch.Tensor], ranks: dict[str, int],
                 threads: int, seen: dict[tuple[Path, ...], dict[str, bool]] | None = None) -> tuple[list[LayerTask], dict[str, Any]]:  # fmt: skip
    """Tasks whose modules are weightless shells; returns them and how tensors travel: how many each way,
    which nodes see the source files, and so whether workers read them (`weights_from`). `seen`: the
    session's earlier answers, reused instead of asking the nodes again."""
    import ray

    readable, seen_by = workers_see(model.weight_files, {} if seen is None else seen)
    store = TensorStore(model.weight_files)
    tasks: list[LayerTask] = []
    counts: dict[str, Any] = {"file": 0, "object_store": 0, "source_seen_by": seen_by,
                              "weights_from": "source files" if readable else "object store"}  # fmt: skip
    for layer in work_layers(plan):
        module = model.module.get_submodule(layer.name)
        tensors: dict[str, TensorSource] = {}
        for param_name, param in module.named_parameters():
            key = f"{layer.name}.{param_name}"
            in_file = located(store, key, tuple(param.shape)) if readable else None
            # a streamed model's parameters are on the meta device: the driver reads them from the file, once
            value = _file_tensor(store, key, param).read() if in_file is None and param.is_meta else param.detach()
            tensors[param_name] = in_file or StoredTensor(ray.put(value))
            counts["file" if in_file else "object_store"] += 1
        gram = grams.get(layer.name)
        tasks.append(LayerTask(layer, weightless_copy(module), gram, ranks.get(layer.name), threads, tensors))
    return tasks, counts


def layer_weights(model: LoadedModel, layers: list[LayerPlan], readable: Callable[[], bool]) -> list[torch.Tensor | TensorSource]:
    """Each layer's weight for a map over layers (the bytes budget's tables): the tensor itself, or for a streamed
    model (weights on the meta device) the file tensor a worker reads, where `readable()` says the workers see the
    files, else the driver's read of it, put in the object store once. Files and nodes are asked only for a
    streamed model."""
    store: TensorStore | None = None
    weights: list[torch.Tensor | TensorSource] = []
    for layer in layers:
        weight = model.module.get_submodule(layer.name).weight
        if not weight.is_meta or not model.weight_files:
            weights.append(weight.detach())
            continue
        if store is None:
            store, workers_read = TensorStore(model.weight_files), readable()
        in_file = _file_tensor(store, f"{layer.name}.weight", weight)
        weights.append(in_file if workers_read else _put(in_file.read()))
    return weights


def _put(tensor: torch.Tensor) -> StoredTensor:
    import ray

    return StoredTensor(ray.put(tensor))


def workers_see(files: tuple[Path, ...] | None, seen: dict[tuple[Path, ...], dict[str, bool]]) -> tuple[bool, dict[str, bool]]:
    """Whether every node that runs tasks sees the source files, and each node's answer; asked once per session
    (`seen` keeps the answers)."""
    if files and files not in seen:
        seen[files] = nodes_seeing(files)
    seen_by = seen.get(files, {}) if files else {}
    return bool(seen_by) and all(seen_by.values()), seen_by


def nodes_seeing(files: tuple[Path, ...], timeout_s: float = 60.0) -> dict[str, bool]:
    """For each alive node that can run layer tasks (has CPUs or GPUs), whether it sees every source file at
    the driver's path with the driver's size: one zero-CPU task pinned to each node. A node without the
    shared volume (or the PVC) answers False, and the tasks get their tensors through the object store."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    expected = [(str(path), path.stat().st_size) for path in files]
    probe = ray.remote(num_cpus=0, max_retries=0)(_sees_files)
    nodes = [node for node in ray.nodes() if node.get("Alive") and (node["Resources"].get("CPU", 0) or node["Resources"].get("GPU", 0))]
    refs = {node["NodeManagerAddress"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(expected)
            for node in nodes}  # fmt: skip
    seen: dict[str, bool] = {}
    for address, ref in refs.items():
        try:
            seen[address] = bool(ray.get(ref, timeout=timeout_s))
        except (ray.exceptions.RayError, TimeoutError):  # a node that cannot answer is not one to count on
            seen[address] = False
    return seen


def remote_weights_note(reference: str, address: str | None) -> str | None:
    """What `--dry-run` says when layer tasks will run on a cluster elsewhere and the source is a local path."""
    scheme, _, path = reference.partition(":")
    if not address or scheme not in ("hf", "file", "krunch"):
        return None
    return (f"  weights: the workers of the Ray cluster at {address} read {path} themselves only if every node sees it "
            "at that path (a shared volume); otherwise the driver puts each tensor into the object store once "
            "(report.json: execution.weights_from)")


def _sees_files(expected: list[tuple[str, int]]) -> bool:
    import os

    return all(os.path.isfile(path) and os.path.getsize(path) == size for path, size in expected)


def weightless_copy(module: nn.Module) -> nn.Module:
    """The module's structure with every parameter on the meta device: a few hundred bytes to ship."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in module.parameters()}
    return copy.deepcopy(module, memo)


def materialise(task: LayerTask) -> nn.Module:
    if not task.tensors:
        return task.module
    module = copy.deepcopy(task.module)  # a retried task must not see a half-filled shell
    for param_name, source in task.tensors.items():
        owner_name, _, leaf = param_name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        meta = getattr(owner, leaf)
        tensor = source.read().to(meta.dtype)  # the cast load_state_dict would have made
        setattr(owner, leaf, nn.Parameter(tensor, requires_grad=meta.requires_grad))
    return module


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Pin torch's intra-op threads: results depend on the thread count in their last bits."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_layer_task(task: LayerTask, device: str = "cpu", before_layer: LayerHook | None = None) -> LayerResult:
    """Compress one layer, on CUDA when `device` says so; the result comes back on the CPU.

    A layer left as it was (method none, no quantization) returns no module:
    the caller already holds it, so it is not shipped back.
    """
    if before_layer is not None:
        before_layer(task.name)
    with torch_threads(task.threads):
        module, gram = materialise(task), task.gram
        if device != "cpu":
            module = copy.deepcopy(module).to(device)  # never move the caller's own module
            gram = None if gram is None else gram.to(device)
        result = compress_layer(task.plan, module, gram, task.allocated)
        result.module = None if result.module is module else result.module.to("cpu")
        result.threads = torch.get_num_threads()
    result.device = device
    return result
