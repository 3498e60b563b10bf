"""Error-propagating calibration (recipe.calibration.propagate): compress block by block, fitting each layer
to the *original* model's outputs given the inputs the already-compressed model feeds it.

Independent calibration whitens every layer for the original model's activations, so the errors of earlier
layers compound unseen. Here the blocks (the nn.ModuleList or nn.Sequential holding the selected layers:
decoder layers, encoder layers, a CNN's convs, each then a block of its own) run in order, and within a
block its stages (layers reading the same tensor: q/k/v, then o, then gate/up, then down) run in order. For
a stage, with X its input in the original model and X~ its input in the model compressed so far (each block
called with the arguments the model itself passes it, recorded on one pass: a hybrid model's sliding and global
layers get different masks and rotary tables; before any work, the blocks replayed in order must reproduce the
model's own hidden states):

    G~ = X~'X~,  K = X'X~,  M0 = W (K + lam I)(G~ + lam I)^-1

M0 is the map from X~ that best reproduces W's outputs on X, ridge-shrunk towards W (the plain least-squares
refit overfits: it has in_features^2 free numbers per layer, fitted on a few thousand tokens). The stage's
layers are then compressed by the usual code with weight M0 and Gram G~ (activation-aware SVD or Tucker, or gptq
rounding, which then also makes up for the quantization upstream: SmolLM2 int4 g64 perplexity 26.6 against
36.1 with the original model's Grams) — through the same executor, so the layers of a stage are parallel
Ray tasks while blocks and stages stay in order.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from krunch.assemble import swap_module
from krunch.errors import KrunchError
from krunch.calibration.grams import ROWS_CHUNK, Batch, calibration_batches, collect_grams, input_rows
from krunch.execution.layer import LayerResult, relative_error
from krunch.execution.executors import Execution, Executor, ProgressCallback
from krunch.model import LoadedModel, ModelKind
from krunch.plan import LayerPlan, Plan
from krunch.spec import Calibration

RIDGE = 0.5  # lam as a fraction of G~'s mean diagonal; MiniLM held-out fidelity: 0 -> 0.52, 0.05 -> 0.60, 0.5 -> 0.61, inf (M0 = W) -> 0.55
# A conv's refit sees every patch position of every image (10^5-10^6 rows for in*kh*kw <= 2304 unknowns): it hardly
# overfits. EasyOCR, activation-aware Tucker at half the conv parameters, word accuracy: 0.5 -> 0.958,
# 0.05 -> 0.963, 0.005 -> 0.966, 0.0005 -> 0.966 (independent calibration 0.951).
CONV_RIDGE = 0.005
DROPPED_KWARGS = ("past_key_values", "past_key_value")  # each block runs standalone, without a cache


@dataclass
class Blocks:
    path: str  # e.g. "model.layers"
    modules: nn.ModuleList | nn.Sequential

    def path_of(self, index: int) -> str:
        """The full name of block `index` (a Sequential's children may be named)."""
        return f"{self.path}.{list(self.modules._modules)[index]}"

    def layers_of(self, index: int, names: list[str]) -> list[str]:
        block = self.path_of(index)
        return [name for name in names if inside(name, block) is not None]


def inside(name: str, block: str) -> str | None:
    """`name` relative to the block at path `block`: "" for the block itself (a conv in a Sequential), None
    for a layer elsewhere."""
    if name == block:
        return ""
    return name.removeprefix(f"{block}.") if name.startswith(f"{block}.") else None


def _within(name: str, block: str) -> str:
    relative = inside(name, block)
    assert relative is not None, (name, block)
    return relative


def _installed(block: nn.Module, relative: str, module: nn.Module) -> nn.Module:
    """The block with the layer at `relative` replaced: the module itself when the layer is the block."""
    if not relative:
        return module
    swap_module(block, relative, module)
    return block


def find_blocks(model: nn.Module, names: list[str]) -> Blocks | None:
    """The ModuleList (a transformer's layers) or Sequential (a CNN's conv stack) whose items hold the most of
    `names`; None if none holds two."""
    best: tuple[int, str, nn.ModuleList | nn.Sequential] | None = None
    for path, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
            held = sum(1 for name in names if name.startswith(f"{path}."))
            if held > 1 and (best is None or held > best[0]):
                best = (held, path, module)
    return None if best is None else Blocks(best[1], best[2])


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> Batch:
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def _output(result: object) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


@dataclass
class BlockCalls:
    """What the model itself passes each block, per calibration batch: the arguments besides the hidden state
    (masks, position embeddings: a hybrid model's sliding and global layers get different ones), and, on the
    first batch, the hidden state too, to check that replaying the blocks one by one reproduces the model."""

    calls: list[list[Batch]]  # calls[block][batch]: (args, kwargs), the hidden state left in place on batch 0 only
    first_hidden: list[torch.Tensor]  # each block's hidden input on the first batch

    def inputs(self, block: int, hidden: list[torch.Tensor] | None = None) -> list[Batch]:
        """Block `block`'s inputs: its own arguments around `hidden` (default: the model's, for block 0)."""
        if hidden is None:
            assert block == 0, "only block 0's hidden inputs are kept for every batch"
            return list(self.calls[0])
        return [_with_hidden(args, kwargs, h) for (args, kwargs), h in zip(self.calls[block], hidden, strict=True)]


def block_calls(model: LoadedModel, blocks: Blocks, calibration: Calibration) -> BlockCalls:
    """One pass of the original model per calibration batch, recording every block's call."""
    calls: list[list[Batch]] = [[] for _ in blocks.modules]
    first_hidden: list[torch.Tensor] = []

    def recorder(index: int):  # noqa: ANN202
        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = {k: v for k, v in kwargs.items() if k not in DROPPED_KWARGS}
            batch = len(calls[index])
            keep = batch == 0 or index == 0  # the other hidden states are recomputed block by block
            hidden = _hidden(args, kwargs).detach().clone() if keep else None  # a copy: later in-place ops (ReLU) change it
            if batch == 0:
                first_hidden.append(hidden)
            calls[index].append(_with_hidden(args, kwargs, hidden))  # type: ignore[arg-type]

        return record

    handles = [block.register_forward_pre_hook(recorder(index), with_kwargs=True) for index, block in enumerate(blocks.modules)]
    handles.append(blocks.modules[-1].register_forward_hook(_stop_forward))  # what follows the blocks (an LM head) is not needed
    try:
        with torch.inference_mode():
            for args, kwargs in calibration_batches(model, calibration):
                extra = {"use_cache": False} if model.kind is ModelKind.CAUSAL_LM else {}
                try:
                    model.module(*args, **kwargs, **extra)
                except _BlocksDone:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    if any(len(c) != len(calls[0]) for c in calls) or len(first_hidden) != len(blocks.modules):
        raise KrunchError("calibration.propagate", f"the blocks of {blocks.path} are not each called once per forward "
                          "(shared or skipped blocks), so they cannot be replayed in order; use propagate: false")  # fmt: skip
    return BlockCalls(calls, first_hidden)


class _BlocksDone(Exception):  # noqa: N818 - control flow, not an error
    """Raised after the last block on a recording pass."""


def _stop_forward(_module: nn.Module, _args: tuple, _output: object) -> None:
    raise _BlocksDone


REPLAY_TOLERANCE = 1e-3  # relative difference between replayed and real block inputs (the same fp32 ops: ~1e-6)


def check_replay(blocks: Blocks, recorded: BlockCalls) -> None:
    """On the first batch, each original block run on the model's own input to it, with its own arguments, must
    give the model's own input to the next block: a model that does work between its blocks cannot be replayed."""
    with torch.inference_mode():
        for index, block in enumerate(blocks.modules[:-1]):
            args, kwargs = _with_hidden(*recorded.calls[index][0], recorded.first_hidden[index].clone())  # in-place ops stay off the record
            replayed, real = _output(block(*args, **kwargs)), recorded.first_hidden[index + 1]
            difference = float((replayed - real).norm() / real.norm().clamp_min(1e-12))
            if difference > REPLAY_TOLERANCE:
                raise KrunchError("calibration.propagate", f"replaying {blocks.path} block by block gives block {index + 1} "
                                  f"inputs {difference:.1%} away from the model's own (the model does work between its "
                                  "blocks that krunch does not replay); use propagate: false for this model")  # fmt: skip


def stages_of(block: nn.Module, names: list[str], block_path: str, sample: Batch) -> list[list[str]]:
    """Group the block's layers by the tensor they read, in the order the block reads them."""
    seen: dict[str, torch.Tensor] = {}
    handles = [block.get_submodule(_within(name, block_path)).register_forward_pre_hook(
        lambda _m, inputs, name=name: seen.setdefault(name, inputs[0])) for name in names]  # fmt: skip
    try:
        with torch.inference_mode():
            block(*sample[0], **sample[1])
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[str]] = []
    for name, tensor in seen.items():  # dict order = call order; holding the tensors keeps identities distinct
        for stage in stages:
            if seen[stage[0]] is tensor:
                stage.append(name)
                break
        else:
            stages.append([name])
    return stages


def original_pass(block: nn.Module, readers: list[str],
                  inputs: list[Batch]) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:  # fmt: skip
    """One pass of the original block: the inputs of each stage (named by a layer reading them), per batch,
    and its hidden outputs. The original block never changes, so its activations are computed once."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in readers}
    handles = [block.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen[name].append(args[0].detach())) for name in readers]  # fmt: skip
    try:
        following = _outputs(block, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen, following


def stage_statistics(working: nn.Module, layer: str, originals: list[torch.Tensor],
                     working_inputs: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """G~ = X~'X~ and K = X'X~ (float64) for the layer's input, over every calibration batch; X comes from
    the original block's pass, X~ from running the working (partly compressed) block."""
    gram = cross = None
    module = working.get_submodule(layer)
    for original, working_batch in zip(originals, working_inputs, strict=True):
        seen: list[torch.Tensor] = []
        handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
        try:
            with torch.inference_mode():
                working(*working_batch[0], **working_batch[1])
        finally:
            handle.remove()
        for part, part_tilde in zip(original.split(ROWS_CHUNK), seen[0].split(ROWS_CHUNK), strict=True):
            x, x_tilde = input_rows(module, part).float(), input_rows(module, part_tilde).float()
            # products in float32 (a float64 matmul is ~4x slower on CPU), sums over batches in float64
            batch_gram, batch_cross = (x_tilde.T @ x_tilde).double(), (x.T @ x_tilde).double()
            gram = batch_gram if gram is None else gram + batch_gram
            cross = batch_cross if cross is None else cross + batch_cross
    assert gram is not None and cross is not None
    return gram, cross


def refitted_weight(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, ridge: float | None = None) -> torch.Tensor:
    """M0 = W (K + lam I)(G~ + lam I)^-1: reproduce W on the original inputs from the compressed ones (a conv's
    kernel as its (out, in*kh*kw) matrix, on input patches)."""
    lam = (RIDGE if ridge is None else ridge) * float(gram.diagonal().mean())
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    matrix = weight.detach().double().reshape(weight.shape[0], -1)
    # M0' = (G~ + lam I)^-1 (K + lam I)' W'   (G~ is symmetric)
    refit = torch.linalg.solve(gram + lam * eye, (cross + lam * eye).T @ matrix.T).T
    return refit.reshape(weight.shape).to(weight.dtype)


class StageWeights(nn.Module):
    """Looks up layers by their full names: the model an executor reads a stage's refitted weights from."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.by_name = layers  # a plain dict: nothing registered, nothing saved

    def get_submodule(self, target: str) -> nn.Module:
        return self.by_name[target]


def _stand_in(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    stand_in = copy.deepcopy(layer)
    with torch.no_grad():
        stand_in.weight.copy_(weight)
    return stand_in


def propagate(executor: Executor, model: LoadedModel, plan: Plan, ranks: dict[str, int], calibration: Calibration,
              progress: ProgressCallback | None = None) -> Execution:  # fmt: skip
    """Every layer of the plan compressed; activation-aware layers inside the blocks by error propagation,
    the others (activation-aware ones outside the blocks and gptq-rounded ones get Grams of the original model) as usual."""
    chained = [layer.name for layer in plan.layers if layer.calibrated and layer.tied_to is None]
    blocks = find_blocks(model.module, chained)
    in_blocks = [] if blocks is None else [name for index in range(len(blocks.modules)) for name in blocks.layers_of(index, chained)]
    outside = [layer.name for layer in plan.layers if layer.calibrated and layer.tied_to is None and layer.name not in in_blocks]
    independent = collect_grams(model, outside, calibration) if outside else {}
    if blocks is None:
        warnings.warn("calibration.propagate: no nn.ModuleList holds two of the layers it refits (activation-aware "
                      "or gptq), so there are no blocks to go through in order; they are calibrated independently", stacklevel=2)  # fmt: skip
        return executor.run(model, plan, independent, ranks, progress)
    total = len([layer for layer in plan.layers if layer.tied_to is None])

    def counted(offset: int) -> ProgressCallback:
        return lambda finished, _total, name: progress(offset + finished, total, name) if progress else None

    rest = Plan([layer for layer in plan.layers if layer.name not in in_blocks])
    first = executor.run(model, rest, independent, ranks, counted(0), bar=False) if rest.layers else None
    results: dict[str, LayerResult] = {r.name: r for r in first.results} if first else {}
    info = first.info if first else {}
    done = len(results)
    by_name = {layer.name: layer for layer in plan.layers}
    recorded = block_calls(model, blocks, calibration)
    check_replay(blocks, recorded)  # before any work: the blocks replayed in order are the model
    inputs = recorded.inputs(0)
    working_inputs = inputs
    count = 1 + max(index for index in range(len(blocks.modules)) if blocks.layers_of(index, in_blocks))  # none after the last refitted one
    bar = tqdm(total=count, desc="propagating", unit="block")
    try:
        for index, original_block in enumerate(blocks.modules[:count]):
            path = blocks.path_of(index)
            working_block = copy.deepcopy(original_block)
            for name, result in results.items():  # layers compressed independently still feed their errors forward
                relative = inside(name, path)
                if relative is not None and result.module is not None:
                    working_block = _installed(working_block, relative, result.module)
            last = index + 1 == count
            outcome = propagate_block(executor, BlockContext(model.reference, model.kind, path, by_name, ranks),
                                      original_block, working_block, blocks.layers_of(index, in_blocks),
                                      (inputs, working_inputs), counted, done, outputs=not last)  # fmt: skip
            info = outcome.info or info
            results.update((result.name, result) for result in outcome.results)
            done += len(outcome.results)
            bar.set_postfix_str(f"{done}/{total} layers", refresh=False)
            if not last:  # the next block's own arguments around these outputs
                inputs = recorded.inputs(index + 1, outcome.following)
                working_inputs = recorded.inputs(index + 1, outcome.working_following)
            bar.update(1)
    finally:
        bar.close()
    ordered = [results[layer.name] for layer in plan.layers if layer.name in results]
    return Execution(ordered, {**info, "calibration": "propagated", "blocks": len(blocks.modules), "ridge": RIDGE,
                                "conv_ridge": CONV_RIDGE})


@dataclass
class BlockContext:
    """What compressing the layers of one block needs besides its tensors: whose block, where, the plan's layers."""

    reference: str
    kind: ModelKind | None
    path: str  # the block's full name
    by_name: dict[str, LayerPlan]
    ranks: dict[str, int]


@dataclass
class BlockOutcome:
    results: list[LayerResult]
    info: dict
    following: list[torch.Tensor]  # the original block's hidden outputs, one per batch ([] when not asked for)
    working_following: list[torch.Tensor]  # the compressed block's


def propagate_block(executor: Executor, context: BlockContext, original_block: nn.Module, working_block: nn.Module,
                    names: list[str], inputs: tuple[list[Batch], list[Batch]],
                    counted: Callable[[int], ProgressCallback | None], done: int, outputs: bool = True) -> BlockOutcome:  # fmt: skip
    """The block's refitted layers (`names`), stage after stage, each compressed for the inputs the compressed
    stages before it feed it; `working_block` (the block with the layers compressed so far) gains them. With
    `outputs`, both blocks' hidden outputs: the next block's inputs."""
    original_inputs, working_inputs = inputs
    path = context.path
    stages = stages_of(original_block, names, path, original_inputs[0]) if names else []
    readers = [_within(stage[0], path) for stage in stages]  # one layer per stage names its input
    originals, following = original_pass(original_block, readers, original_inputs)
    results: list[LayerResult] = []
    info: dict = {}
    for stage, reader in zip(stages, readers, strict=True):
        staged = _compress_stage(executor, context, stage, original_block, working_block,
                                 (originals[reader], working_inputs), counted(done + len(results)))  # fmt: skip
        info = staged.info
        for result in staged.results:
            results.append(result)
            working_block = _installed(working_block, _within(result.name, path), result.module)
    working_following = _outputs(working_block, working_inputs) if outputs else []
    return BlockOutcome(results, info, following if outputs else [], working_following)


def _compress_stage(executor: Executor, context: BlockContext, stage: list[str], original_block: nn.Module,
                    working_block: nn.Module, inputs: tuple[list[torch.Tensor], list[Batch]],
                    progress: ProgressCallback | None) -> Execution:  # fmt: skip
    """One stage's layers, refitted for the compressed inputs and compressed by the executor (in parallel)."""
    path = context.path
    gram, cross = stage_statistics(working_block, _within(stage[0], path), *inputs)
    weights = {}
    for name in stage:  # the stage's layers read one tensor: one G~ and one K serve them all
        layer = original_block.get_submodule(_within(name, path))
        ridge = CONV_RIDGE if isinstance(layer, nn.Conv2d) else RIDGE
        weights[name] = _stand_in(layer, refitted_weight(layer.weight, gram, cross, ridge))
    stand_in = LoadedModel(f"{context.reference}#{path}", StageWeights(weights), context.kind)
    plan = Plan([context.by_name[name] for name in stage])
    staged = executor.run(stand_in, plan, dict.fromkeys(stage, gram), context.ranks, progress, bar=False)
    for result in staged.results:
        result.rel_error = relative_error(result.module, original_block.get_submodule(_within(result.name, path)).weight)
    return staged


def _outputs(block: nn.Module, inputs: list[Batch]) -> list[torch.Tensor]:
    """The block's hidden outputs, one per batch: the next block's hidden inputs."""
    with torch.inference_mode():
        return [_output(block(*args, **kwargs)) for args, kwargs in inputs]
