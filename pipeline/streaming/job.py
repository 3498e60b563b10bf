"""A whole job with the driver holding about one block of weights (`spec.resources.stream`): the source is built on
the meta device and streamed from its files for the before-evaluation, layers are compressed a group of about one
block at a time and written to shards as each group finishes, and the after-evaluation streams the written model.

The layer tasks read their own tensors from the source files as in any job (on Ray, or in this process); the
driver's peak is its fixed overhead plus one block, one group's results and one shard being gathered.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from krunch.artifact import load_compressed, runs_within, weight_files, write_manifest
from krunch.calibration.grams import collect_grams
from krunch.assemble import share_tied_weight
from krunch.evaluation import EvalOptions, evaluate
from krunch.execution.executors import Executor, ProgressCallback
from krunch.execution.layer import LayerResult
from krunch.model import LoadedModel
from krunch.plan import LayerPlan, Plan, make_plan
from krunch.results import CompressionResult
from krunch.runtime.base import CompressedLayer
from krunch.sizes import count_params, float_dtype, weight_bytes
from krunch.sources.hf import architecture_only
from krunch.sources.stated import load_stated
from krunch.spec import Calibration, CompressionJob, SpecError
from krunch.streaming.blocks import block_tasks
from krunch.streaming.memory import return_freed_memory
from krunch.streaming.store import TensorStore, stored_names
from krunch.streaming.units import block_bytes, compute_dtype_for, stream
from krunch.streaming.writer import ShardWriter

FIELD = "spec.resources.stream"
SHARD_BLOCKS = 1  # a shard is written once about one block's worth of compressed tensors has gathered
MIN_SHARD_BYTES = 32 * 2**20


def check_streamable(job: CompressionJob) -> None:
    """What the streamed driver does not do yet, refused by name before anything is loaded."""
    recipe, evaluation = job.spec.recipe, job.spec.evaluation
    refused = [
        ("spec.recipe.heal", recipe.heal is not None, "healing"),
        ("spec.recipe.target", recipe.target is not None and recipe.target.param_ratio is not None,
         "a paramRatio target (bytesRatio streams)"),
        ("spec.evaluation.reference", evaluation.reference is not None, "an evaluation reference other than the source"),
        ("spec.evaluation.compiledDecode", evaluation.compiled_decode, "inference-speed figures"),
    ]  # fmt: skip
    for field, present, what in refused:
        if present:
            raise SpecError(field, f"{what} with {FIELD}: true is not supported yet (a streamed driver holds one block of "
                                   "weights; these need the whole model or statistics of every layer): set stream: false")  # fmt: skip


def load_streamed(job: CompressionJob) -> tuple[LoadedModel, TensorStore]:
    """The source on the meta device, every unit reading its tensors from the source's safetensors files."""
    with architecture_only(keep_files=True):
        model = load_stated(job.spec.model, "spec.model")
    if not model.weight_files or not any(t.is_meta for t in model.module.state_dict(keep_vars=True).values()):
        raise SpecError(FIELD, f"{job.spec.model.source} is not built by transformers from safetensors files (hf:DIR, "
                               "zoo: language and embedding models), so it cannot be streamed: set stream: false")  # fmt: skip
    store = TensorStore(model.weight_files)
    try:
        stream(model.module, store)
    except KeyError as err:
        raise SpecError("spec.model.source", f"cannot be streamed: {err.args[0]}") from None
    return model, store


def layer_groups(model: nn.Module, plan: Plan, limit: int) -> list[list[LayerPlan]]:
    """The plan's layers in module order, cut into runs of at most `limit` source bytes (a bigger layer alone)."""
    weights = [(layer, model.get_submodule(layer.name).weight) for layer in plan.layers]
    return [run for run in runs_within([(layer, w.numel() * w.element_size()) for layer, w in weights], limit) if run]


class StreamedOutput:
    """The compressed model's files, written as its layers come: tensors to shards, layer entries for the manifest."""

    def __init__(self, directory: Path, source: LoadedModel, store: TensorStore, plan: Plan, shard_bytes: int) -> None:
        self.writer = ShardWriter(directory, shard_bytes)
        self.source, self.store, self.plan = source, store, plan
        self.keys = stored_names(source.module, store)  # state-dict name -> the key the source files hold it under
        self.entries: dict[str, dict[str, Any]] = {}
        self.replaced: set[str] = set()

    def add(self, result: LayerResult) -> None:
        module = result.module
        if not isinstance(module, CompressedLayer):
            return  # left as it was: its tensors are copied from the source with the rest
        self._write(result.name, module, tied_to=None)
        result.kernels, result.module = module.kernels(), None
        for layer in self.plan.layers:
            if layer.tied_to == result.name:
                self._write_tied(layer, module)

    def _write(self, name: str, module: nn.Module, tied_to: str | None, skip: set[int] = frozenset()) -> None:
        for key, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) not in skip or not tensor.numel():  # empty tensors are saved under every name, as save_weights does
                self.writer.add(f"{name}.{key}", tensor)
        self.entries[name] = {"name": name, "type": type(module).__name__, "config": module.config(), "tied_to": tied_to}
        self.replaced.add(name)

    def _write_tied(self, layer: LayerPlan, owner: nn.Module) -> None:
        """A tied layer (the LM head) built around its owner's quantized weight, which is stored once, as the owner's."""
        shell = self.source.module.get_submodule(layer.name)
        with torch.device("meta"):
            replacement = layer.implementation.build(layer, shell, [], None)
        share_tied_weight(replacement, owner)
        shared = {id(t) for t in owner.state_dict(keep_vars=True).values()}
        for key, tensor in replacement.state_dict(keep_vars=True).items():
            if tensor.is_meta and id(tensor) not in shared:  # a tensor of its own (a bias): the source's
                owner_name, _, leaf = key.rpartition(".")
                target = replacement.get_submodule(owner_name) if owner_name else replacement
                table = target._parameters if leaf in target._parameters else target._buffers
                table[leaf] = self.store.read(self.keys[f"{layer.name}.{key}"]).clone()
        self._write(layer.name, replacement, layer.tied_to, skip=shared)

    def close(self, recipe: dict[str, Any], source: dict[str, Any]) -> list[Path]:
        """The source's tensors outside the replaced layers (norms, layers left dense), then the index and manifest."""
        written: set[int] = set()
        for name, tensor in self.source.module.state_dict(keep_vars=True).items():
            if any(name == r or name.startswith(f"{r}.") for r in self.replaced) or id(tensor) in written:
                continue
            written.add(id(tensor))
            self.writer.add(name, self.store.read(self.keys[name]))
        files = self.writer.close()
        order = {name: index for index, (name, _) in enumerate(self.source.module.named_modules())}
        layers = sorted(self.entries.values(), key=lambda entry: order[entry["name"]])
        kind = self.source.kind.value if self.source.kind else None
        write_manifest(self.writer.directory, source, kind, recipe, layers)
        return files


def run_streamed_compression(job: CompressionJob, out_dir: Path, executor: Executor,
                             progress: ProgressCallback | None = None) -> CompressionResult:  # fmt: skip
    """`run_compression` with the driver holding about one block of weights; the same report and output files."""
    from krunch.api import Compressed
    from krunch.run import Timings, allocate_target, build_report, check_text_data, evaluation_task, recipe_document, write_report

    check_streamable(job)
    heap = return_freed_memory()
    timings = Timings()
    source, store = load_streamed(job)
    task = evaluation_task(job, source)
    plan = make_plan(source.module, job.spec.recipe)
    check_text_data(job, source, task)
    start = timings.record("load", timings.started)
    with executor.session():  # bytesRatio: each layer's candidate table is a task that reads the layer from its file
        allocation = allocate_target(job.spec.recipe, source, plan, executor)
    plan = allocation.plan
    start = timings.record("allocate", start)
    evaluation = job.spec.evaluation
    options = EvalOptions(data=evaluation.data, tokens=evaluation.tokens, items=evaluation.items, streamed=True)
    metrics_before = evaluate(source, task, options, reference=source)
    start = timings.record("evaluate", start)

    limit = block_bytes(source.module)
    output = StreamedOutput(out_dir, source, store, plan, max(MIN_SHARD_BYTES, SHARD_BLOCKS * limit))
    work = [layer for layer in plan.layers if layer.tied_to is None]
    results: list[LayerResult] = []
    info: dict[str, Any] = {}
    bar = tqdm(total=len(work), desc="compressing", unit="layer")

    def written(result: LayerResult) -> None:
        output.add(result)
        results.append(result)
        bar.update(1)
        if progress:
            progress(len(results), len(work), result.name)

    calibration = job.spec.recipe.calibration or Calibration()
    try:
        with executor.session():
            staged = None
            if any(layer.calibrated for layer in work):  # calibrated block by block, in tasks that keep the statistics
                staged = block_tasks(source, store, Plan(work), allocation.ranks, calibration, compute_dtype_for(source.module))
            rest = staged.outside if staged else work
            outside = [layer.name for layer in rest if layer.calibrated]
            grams = collect_grams(source, outside, calibration, stop_when_seen=True) if outside else {}
            groups = layer_groups(source.module, Plan(rest), limit)
            for group in groups:
                group_grams = {layer.name: grams[layer.name] for layer in group if layer.name in grams}
                execution = executor.run(source, Plan(group), group_grams, allocation.ranks, bar=False)
                info = execution.info
                for result in execution.results:
                    written(result)
                del execution  # the group's results are written: nothing of them stays in the driver
            if staged:
                for done in executor.run_blocks(staged.tasks, staged.first_hidden, source.weight_files):
                    info = {**done.info, "calibration": "propagated" if calibration.propagate else "independent",
                            "calibrated_blocks": len(staged.tasks)}  # fmt: skip
                    for result in done.results:
                        written(result)
    finally:
        bar.close()
    staged = grams = None  # the first block's hidden inputs, the blocks' calls and Grams: nothing the evaluation needs
    reference = {"source": source.metadata.get("pinned_reference", job.spec.model.source), "factory": job.spec.model.factory}
    files = output.close(recipe_document(job.spec.recipe), reference)
    start = timings.record("decompose", start)

    compressed = load_compressed(out_dir, streamed=True)
    metrics_after = evaluate(compressed, task, options, reference=source)
    start = timings.record("evaluate", start)
    tied = {layer.name: layer.tied_to for layer in plan.layers if layer.tied_to}
    by_name = {r.name: r for r in results}
    ordered = [by_name[layer.name] for layer in plan.layers if layer.name in by_name]
    execution_info = {**info, "driver": "streamed", "block_bytes": limit, "groups": len(groups),
                      "shards": len(files), "malloc_threshold_fixed": heap, "inference_figures": "not measured: a streamed model reads its weights on every call"}  # fmt: skip
    summary = Compressed(compressed, job.spec.recipe, plan, ordered, tied, execution_info, allocation.budget, timings=timings.stages,
                         source_params=count_params(source.module), source_bytes=weight_bytes(source.module),
                         source_dtype=float_dtype(source.module), source_fp16_bytes=weight_bytes(source.module, float_bytes=2))  # fmt: skip
    timings.stages["total_s"] = round(time.perf_counter() - timings.started, 3)
    report = build_report(job.metadata.name, job.spec.model.source, task.value, summary, metrics_before, metrics_after,
                          timings.stages, weight_files(out_dir), source.metadata.get("registry_version"))  # fmt: skip
    write_report(out_dir, report, allocation.budget)
    loaded = load_compressed(out_dir, mapped=True)  # what MLflow pickles and a caller uses: the written files' pages
    loaded.reference = f"krunch:{out_dir}"
    return CompressionResult(report, loaded)
