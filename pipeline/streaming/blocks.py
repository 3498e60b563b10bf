"""Calibrated layers of a streamed model (gptq, grids fitted to the inputs, activation-aware factors; with
`calibration.propagate` or without), one block at a time, so that no calibration statistic passes through the driver.

The driver records what the model passes each block on the calibration data (one streamed forward, stopped after
the last block) and keeps the first block's hidden inputs. Each block is then one task: it reads the block's tensors
(from the files, or the object store where a worker cannot see them), runs the block on its hidden inputs, collects
its layers' Grams from that pass (or, with `propagate`, refits them stage by stage exactly as
`calibration.propagate` does for a whole model), compresses them, and returns the compressed layers and the block's
hidden outputs. On Ray those outputs go to the next block's task as object references: the Grams (Qwen2.5-1.5B's
down_proj alone is 642 MB in float64) and the activations stay in the workers.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from krunch.calibration.grams import Batch, recording_grams
from krunch.calibration.propagate import (BlockContext, StageWeights, _hidden, _installed, _outputs, _with_hidden,
                                          block_calls, check_replay, find_blocks, inside, propagate_block)  # fmt: skip
from krunch.execution.layer import LayerResult
from krunch.execution.tasks import FileTensor, TensorSource
from krunch.model import LoadedModel
from krunch.plan import LayerPlan, Plan
from krunch.runtime.base import CompressedLayer
from krunch.spec import Calibration, SpecError
from krunch.streaming.store import TensorStore, stored_names

Hidden = list[torch.Tensor]  # one block's hidden inputs (or outputs), one tensor per calibration batch


@dataclass
class BlockTask:
    """One block's calibrated compression, everything a worker needs to run it alone."""

    context: BlockContext  # whose block, its full name, the plan's layers and ranks
    shell: nn.Module  # the block's structure, every tensor on the meta device
    tensors: dict[str, TensorSource]  # each state-dict entry of the block (names within it): where it is read
    layers: list[str]  # the plan's layers inside the block, in plan order
    calibrated: list[str]  # those fitted to calibration data
    calls: list[Batch]  # the block's own arguments on each calibration batch, the hidden state left out
    propagate: bool
    compute_dtype: torch.dtype | None  # the streamed model's (float32 for a 16-bit model on a CPU slow at it)

    @property
    def name(self) -> str:
        return self.context.path


@dataclass
class BlockDone:
    results: list[LayerResult]  # a result whose layer stays as it was carries no module
    info: dict[str, Any] = field(default_factory=dict)


def materialised(task: BlockTask) -> nn.Module:
    """The block with its tensors read (own copies, in the compute dtype where the model computes in another)."""
    block = copy.deepcopy(task.shell)
    state = {}
    for name, source in task.tensors.items():
        tensor = source.read()
        convert = task.compute_dtype is not None and tensor.is_floating_point()
        state[name] = tensor.to(task.compute_dtype, copy=True) if convert else tensor.clone()
    block.load_state_dict(state, strict=True, assign=True)
    return block


def run_block_task(task: BlockTask, hidden: Hidden, working: Hidden | None, layer_threads: int) -> tuple[BlockDone, Hidden, Hidden | None]:
    """Compress the block's layers; its hidden outputs for the next block, and with `propagate` the outputs of the
    block as compressed (the next block's working inputs)."""
    from krunch.execution.executors import InProcessExecutor

    block, context = materialised(task), task.context
    executor = InProcessExecutor(layer_threads)
    within = {name: inside(name, context.path) or "" for name in task.layers}
    view = LoadedModel(f"{context.reference}#{context.path}", StageWeights({n: block.get_submodule(within[n]) for n in task.layers}),
                       context.kind)  # fmt: skip
    inputs = [_with_hidden(args, kwargs, h) for (args, kwargs), h in zip(task.calls, hidden, strict=True)]
    plans = {name: context.by_name[name] for name in task.layers}
    if task.propagate:
        assert working is not None
        plain = [plans[name] for name in task.layers if name not in task.calibrated]
        first = executor.run(view, Plan(plain), {}, context.ranks, bar=False).results if plain else []
        working_block = copy.deepcopy(block)
        for result in first:  # layers compressed without calibration still feed their errors forward
            working_block = _installed(working_block, within[result.name], result.module)
        working_inputs = [_with_hidden(args, kwargs, h) for (args, kwargs), h in zip(task.calls, working, strict=True)]
        outcome = propagate_block(executor, context, block, working_block, task.calibrated, (inputs, working_inputs),
                                  lambda _done: None, 0)  # fmt: skip
        results, info = first + outcome.results, outcome.info
        following, working_following = outcome.following, outcome.working_following
    else:
        grams: dict[str, torch.Tensor] = {}
        with recording_grams({name: view.module.get_submodule(name) for name in task.calibrated}, grams):
            following = _outputs(block, inputs)
        execution = executor.run(view, Plan(list(plans.values())), grams, context.ranks, bar=False)
        results, info, working_following = execution.results, execution.info, None
    order = {name: index for index, name in enumerate(task.layers)}
    for result in results:
        if not isinstance(result.module, CompressedLayer):
            result.module = None  # left as it was: the source's tensors are copied with the rest
        elif task.compute_dtype is not None:  # float parts (a bias) stored in the source's dtype, as compress_layer does
            result.module.store_floats_as(task.shell.get_submodule(within[result.name]).weight.dtype)
    return BlockDone(sorted(results, key=lambda r: order[r.name]), info), following, working_following


def weightless_block(block: nn.Module) -> nn.Module:
    """A streamed block's structure to ship: its tensors are meta already; the streamed forwards are dropped."""
    forwards = {id(module.__dict__["forward"]): None for module in block.modules() if "forward" in module.__dict__}
    shell = copy.deepcopy(block, forwards)
    for module in shell.modules():
        if "forward" in module.__dict__:
            del module.__dict__["forward"]
    return shell


@dataclass
class StreamedCalibration:
    """What a streamed job's calibrated layers need: the blocks' tasks in order, the first block's hidden inputs, and
    the layers outside the blocks (compressed by the usual path, calibrated ones with Grams of their own)."""

    tasks: list[BlockTask]
    first_hidden: Hidden
    outside: list[LayerPlan]


def block_tasks(source: LoadedModel, store: TensorStore, plan: Plan, ranks: dict[str, int], calibration: Calibration,
                compute_dtype: torch.dtype | None) -> StreamedCalibration:  # fmt: skip
    """Record the blocks' calls on the calibration data (one streamed forward) and cut the plan into block tasks."""
    work = [layer for layer in plan.layers if layer.tied_to is None]
    calibrated = [layer.name for layer in work if layer.calibrated]
    blocks = find_blocks(source.module, calibrated)
    if blocks is None:
        raise SpecError("spec.recipe.calibration", f"{source.reference} has no list of blocks holding two of the layers "
                        "calibrated, and a streamed driver calibrates block by block: set stream: false")  # fmt: skip
    count = len(blocks.modules)
    block_of = {layer.name: next((i for i in range(count) if inside(layer.name, blocks.path_of(i)) is not None), None) for layer in work}
    last = max(i for name, i in block_of.items() if i is not None and name in calibrated)
    recorded = block_calls(source, blocks, calibration)
    check_replay(blocks, recorded)  # before any work: the blocks replayed in order are the model
    keys = stored_names(source.module, store)
    by_name = {layer.name: layer for layer in work}
    tasks = []
    for index in range(last + 1):  # blocks without layers of the plan still carry the hidden states forward
        path = blocks.path_of(index)
        block = blocks.modules[index]
        inside_block = [layer.name for layer in work if block_of[layer.name] == index]
        stored = {local: keys[f"{path}.{local}"] for local in block.state_dict(keep_vars=True)}
        tensors = {local: FileTensor(store.path_of(key), key) for local, key in stored.items()}
        calls = [_with_hidden(args, kwargs, None) for args, kwargs in recorded.calls[index]]  # type: ignore[arg-type]
        context = BlockContext(source.reference, source.kind, path, {n: by_name[n] for n in inside_block}, {n: ranks[n] for n in inside_block if n in ranks})
        tasks.append(BlockTask(context, weightless_block(block), tensors, inside_block, [n for n in inside_block if n in calibrated],
                               calls, bool(calibration.propagate), compute_dtype))  # fmt: skip
    first = [_hidden(args, kwargs) for args, kwargs in recorded.inputs(0)]
    handled = {name for task in tasks for name in task.layers}
    return StreamedCalibration(tasks, first, [layer for layer in work if layer.name not in handled])


def staged_in_object_store(task: BlockTask) -> BlockTask:
    """The task with every tensor read here and put into Ray's object store, for workers that cannot see the files."""
    from krunch.execution.tasks import StoredTensor

    import ray

    tensors = {name: StoredTensor(ray.put(source.read())) if isinstance(source, FileTensor) else source for name, source in task.tensors.items()}
    return replace(task, tensors=tensors)


def run_in_order(tasks: list[BlockTask], first: Hidden, layer_threads: int) -> Iterator[BlockDone]:
    """The blocks one after another in this process (the reference for the Ray path)."""
    hidden, working = first, (first if tasks and tasks[0].propagate else None)
    for task in tasks:
        done, hidden, working = run_block_task(task, hidden, working, layer_threads)
        yield done
