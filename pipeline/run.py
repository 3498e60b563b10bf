"""The compression job, stage by stage: load -> plan -> calibrate -> allocate -> decompose/quantize ->
assemble -> heal (optional) -> evaluate before and after -> save, returning the report.

Each stage is a function of plain inputs; the per-layer stage runs through an
executor (Ray by default, see krunch.execution), the rest in this process.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from krunch import __version__
from krunch.artifact import save_compressed, weight_files
from krunch.assemble import assemble
from krunch.plan.budget import BudgetError, allocate
from krunch.calibration.grams import calibration_batches, collect_grams
from krunch.execution.layer import LayerResult
from krunch.execution.executors import Execution, Executor, InProcessExecutor, ProgressCallback, RayExecutor
from krunch.errors import KrunchError
from krunch.evaluation import EvalOptions, Task, default_task, evaluate
from krunch.evaluation.tasks import task_spec
from krunch.execution.heal import HealResult, StepCallback
from krunch.sources.stated import load_reference, load_stated
from krunch.model import LoadedModel, ModelKind
from krunch.results import BUDGET, REPORT, CompressionResult, Report
from krunch.plan import LayerPlan, Plan, largest_saving_rank, make_plan
from krunch.plan.profile import DEFAULT_MAX_ERROR, max_error, profile
from krunch.sizes import bytes_without_bias, count_params, weight_bytes
from krunch.spec import Calibration, CompressionJob, Recipe, SpecError

if TYPE_CHECKING:
    from krunch.api import Compressed


@dataclass
class Timings:
    started: float = field(default_factory=time.perf_counter)
    stages: dict[str, float] = field(default_factory=dict)

    def record(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.stages[f"{stage}_s"] = round(self.stages.get(f"{stage}_s", 0.0) + now - since, 3)
        return now


def load_source(job: CompressionJob) -> LoadedModel:
    return load_stated(job.spec.model, "spec.model")


def job_reference(job: CompressionJob, model: LoadedModel, task: Task) -> LoadedModel:
    return load_reference(job.spec.evaluation.reference, model, task_spec(task).needs_reference, task.value)


def evaluation_task(job: CompressionJob, model: LoadedModel) -> Task:
    """The job's task, with the evaluation and calibration fields it would ignore refused (before any work)."""
    task = Task(job.spec.evaluation.task) if job.spec.evaluation.task else default_task(model)
    wanted = task_spec(task).kind
    if model.kind is not None and model.kind is not wanted:
        raise SpecError("spec.evaluation.task", f"{task.value} needs a {wanted.value} model; {job.spec.model.source} is a {model.kind.value}")
    evaluation = job.spec.evaluation
    if task is not Task.PERPLEXITY:
        for field in ("data", "tokens"):  # set to anything but the default (a dumped and re-read job repeats defaults)
            if getattr(evaluation, field) != type(evaluation).model_fields[field].default:
                raise SpecError(f"spec.evaluation.{field}", f"applies to the perplexity task only; the {task.value} task "
                                                             "reads its own data sets and would ignore it")  # fmt: skip
    calibration = job.spec.recipe.calibration
    for field, value in (("spec.evaluation.data", evaluation.data), ("spec.recipe.calibration.data", calibration and calibration.data)):
        if isinstance(value, str) and value.startswith("file:") and not Path(value.removeprefix("file:")).expanduser().is_file():
            raise SpecError(field, f"{value}: file not found")
    return task


def check_text_data(job: CompressionJob, model: LoadedModel, task: Task) -> None:
    """Text the job will read exists, is text, splits in two and has the tokens asked for: checked by reading
    it before any work, not an hour in."""
    from krunch.data.text import Split, token_slice
    from krunch.evaluation.perplexity import DEFAULT_DATA

    recipe = job.spec.recipe
    needs = []
    if model.kind in (ModelKind.CAUSAL_LM, ModelKind.SENTENCE_EMBEDDING) and (recipe.uses_calibration or recipe.heal):
        calibration = recipe.calibration or Calibration()
        needs.append(("spec.recipe.calibration", calibration.data, Split.CALIBRATION, calibration.tokens))
        if recipe.heal is not None:
            needs.append(("spec.recipe.heal.tokens", calibration.data, Split.CALIBRATION, recipe.heal.tokens))
    if task is Task.PERPLEXITY:
        needs.append(("spec.evaluation", job.spec.evaluation.data or DEFAULT_DATA, Split.EVALUATION, job.spec.evaluation.tokens))
    for field, data, split, tokens in needs:
        try:
            token_slice(model.tokenizer, data, split, tokens)
        except KrunchError as err:
            raise SpecError(field, str(err)) from None


@dataclass
class PreparedJob:
    """A job's source model, task, evaluation reference and plan, with everything that can fail before any
    work checked (`krunch compress --dry-run` stops here)."""

    model: LoadedModel
    task: Task
    reference: LoadedModel
    plan: Plan


def prepare_job(job: CompressionJob) -> PreparedJob:
    model = load_source(job)
    task = evaluation_task(job, model)
    reference = job_reference(job, model, task)
    plan = make_plan(model.module, job.spec.recipe)  # a recipe that does not fit the model fails before Ray starts
    check_text_data(job, model, task)
    return PreparedJob(model, task, reference, plan)


def calibration_grams(recipe: Recipe, model: LoadedModel, plan: Plan) -> dict[str, torch.Tensor]:
    names = [layer.name for layer in plan.layers if layer.calibrated and layer.tied_to is None]
    if not names:
        return {}
    return collect_grams(model, names, recipe.calibration or Calibration())


@dataclass
class Allocation:
    """What the recipe's target decided: the plan to run (bytesRatio may turn layers dense or quantized),
    ranks of the allocated layers, and for bytesRatio the candidate tables and choices."""

    plan: Plan
    ranks: dict[str, int]
    budget: dict[str, Any] | None = None


def allocate_target(recipe: Recipe, model: LoadedModel, plan: Plan, executor: Executor | None = None) -> Allocation:
    target = recipe.target
    if target is None:
        return Allocation(plan, {})
    if target.bytes_ratio is not None:
        return allocate_bytes(recipe, model, plan, executor or InProcessExecutor())
    return Allocation(plan, allocate_ranks(recipe, model, plan))


def allocate_bytes(recipe: Recipe, model: LoadedModel, plan: Plan, executor: Executor) -> Allocation:
    """target.bytesRatio: per layer, dense / factorised at a rank, as floats or at the widths target.bits offers, within the bytes.
    Each layer's candidate table (an SVD and a quantization per layout) is a task on the executor."""
    from krunch.plan.size_budget import applied, choose, quantize_configs, table_for

    target = recipe.target
    configs = quantize_configs(recipe.quantize, target.bits)
    tables = executor.map_layers(partial(table_for, configs=configs), model, plan.allocated, "size budget")
    dense = sum(table.dense_bytes for table in tables)
    budget = round(target.bytes_ratio * dense)
    smallest = sum(table.candidates[0].bytes for table in tables)
    if smallest > budget:
        raise SpecError(target.field, f"{budget:,} bytes ({target.bytes_ratio} of {dense:,}) is below the smallest possible "
                                      f"{smallest:,} (every layer at its smallest candidate)")  # fmt: skip
    chosen = choose(tables, budget)
    layers = [applied(layer, chosen[layer.name]) if layer.name in chosen else layer for layer in plan.layers]
    ranks = {name: c.rank for name, c in chosen.items() if c.rank is not None}
    summary = {
        "bytes_ratio": target.bytes_ratio, "dense_bytes": dense, "budget_bytes": budget,
        "planned_bytes": sum(c.bytes for c in chosen.values()),
        "choices": {name: {"choice": c.label, "kind": c.kind, "bytes": c.bytes, "error": c.error} for name, c in chosen.items()},
        "tables": [{"name": t.name, "dense_bytes": t.dense_bytes,
                    "candidates": [{"choice": c.label, "bytes": c.bytes, "error": c.error} for c in t.candidates]} for t in tables],
    }  # fmt: skip
    return Allocation(Plan(layers), ranks, summary)


def allocate_ranks(recipe: Recipe, model: LoadedModel, plan: Plan) -> dict[str, int]:
    """target.paramRatio: ranks for the layers that share the parameter budget, each above its rule's floor;
    empty without a target.

    Shares come from the weights' own spectra even for activation-aware layers. Whitened spectra of layers
    with outlier activations (a direction carrying >99% of the energy) make a normalised error look tiny
    and starve them (SmolLM2 at 0.8: perplexity 203 vs 112 with weight spectra). Floored at half the
    target they did better on SmolLM2's whitened SVD at 0.9 (93.2 vs 100.9) but worse everywhere else
    measured (SmolLM2 propagated 67.9 vs 67.1; MiniLM fidelity 0.808 vs 0.829 at 0.9, 0.731 vs 0.750 for
    the feed-forward layers at 0.5).
    """
    target = recipe.target
    if target is None or target.param_ratio is None:
        return {}
    layers = plan.allocated
    profiles = [profile(layer, layer.implementation.spectra(layer, model.module.get_submodule(layer.name).weight.float(), None)) for layer in layers]
    for layer, options in zip(layers, profiles, strict=True):
        if not options.options and layer.floor is not None:
            raise SpecError(f"{layer.field}.floor", f"{layer.floor} of {layer.name}'s parameters is more than any rank that "
                            f"saves space keeps (break-even rank {largest_saving_rank(layer)}) under an error of at most "
                            f"{max_error(layer)}")  # fmt: skip
        if not options.options:
            raise SpecError(f"{layer.field}.maxError", f"every rank of {layer.name} that saves space leaves a relative error "
                            f"above {max_error(layer)}: raise maxError, or leave this layer dense")  # fmt: skip
    biases = sum(layer.bias_params for layer in layers)
    budget = round(target.param_ratio * sum(layer.params for layer in layers)) - biases  # biases stay dense
    try:
        chosen = allocate(profiles, budget)
    except BudgetError as err:
        raise SpecError(target.field, str(err) + _floors_hint(layers)) from None
    return {name: option.rank for name, option in chosen.items()}


def _floors_hint(layers: list[LayerPlan]) -> str:
    floors = sorted({layer.field for layer in layers if layer.floor is not None})
    hints = [f"rule floors ({', '.join(f + '.floor' for f in floors)})"] if floors else []
    if any(max_error(layer) < 1 for layer in layers):
        hints.append(f"error ceilings (maxError, default {DEFAULT_MAX_ERROR})")
    return f"; {' and '.join(hints)} raise that smallest total" if hints else ""


def heal_stage(recipe: Recipe, executor: Executor, compressed: LoadedModel, original: LoadedModel,
               on_step: StepCallback | None = None, show: bool = True) -> HealResult:  # fmt: skip
    """recipe.heal: distil the assembled model towards the original on the calibration half of the data."""
    from tqdm import tqdm

    spec = recipe.heal
    assert spec is not None
    calibration = recipe.calibration or Calibration()
    batches = list(calibration_batches(original, Calibration(data=calibration.data, tokens=spec.tokens, items=spec.items)))
    bar = tqdm(total=spec.steps, desc="healing", unit="step", disable=not show)

    def step(done: int, total: int, loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        bar.update(1)
        if on_step:
            on_step(done, total, loss)

    try:
        return executor.heal(compressed, original, batches, spec, step)
    finally:
        bar.close()


def compress_layers(recipe: Recipe, executor: Executor, original: LoadedModel, plan: Plan, ranks: dict[str, int],
                    progress: ProgressCallback | None, show: bool = True) -> Execution:  # fmt: skip
    """Calibrate and compress every layer: independently, or block by block with calibration.propagate
    (which takes its own statistics, from the partly compressed model)."""
    calibration = recipe.calibration
    if calibration is not None and calibration.propagate:
        from krunch.calibration.propagate import propagate

        return propagate(executor, original, plan, ranks, calibration, progress)
    return executor.run(original, plan, calibration_grams(recipe, original, plan), ranks, progress, bar=show)


def assembled(original: LoadedModel, plan: Plan, results: list[LayerResult], inplace: bool = False) -> tuple[LoadedModel, dict[str, str]]:
    """A copy of the original (or, `inplace`, the original itself) with the layers' replacements installed; and
    which layers are tied to which."""
    module = original.module if inplace else copy.deepcopy(original.module)
    compressed = LoadedModel(original.reference, module, original.kind, original.tokenizer, original.preprocess,
                             original.charset, dict(original.metadata))  # fmt: skip
    by_name = {r.name: r for r in results}
    replacements = {layer.name: by_name[layer.name].module for layer in plan.layers if layer.tied_to is None}
    tied = {layer.name: layer.tied_to for layer in plan.layers if layer.tied_to}
    for name, owner in tied.items():
        replacements[name] = _tied_replacement(plan, name, original, replacements[owner])
    assemble(compressed.module, replacements, tied)
    return compressed, tied


def run_compression(job: CompressionJob, out_dir: Path, progress: ProgressCallback | None = None,
                    executor: Executor | None = None, heal_progress: StepCallback | None = None) -> CompressionResult:  # fmt: skip
    """The whole job: load, evaluate the source, `krunch.compress`, evaluate the result, save. Layer tasks run on Ray
    (`RAY_ADDRESS`, or a local instance) unless given another executor. The layers are swapped into the source
    model itself (no second copy of it in memory) unless healing or the evaluation's reference needs it after."""
    from krunch.api import compress

    executor = executor or RayExecutor.from_resources(job.spec.resources)
    if job.spec.resources.stream:
        from krunch.streaming.job import run_streamed_compression

        return run_streamed_compression(job, out_dir, executor, progress)
    timings = Timings()
    prepared = prepare_job(job)
    original, task, reference = prepared.model, prepared.task, prepared.reference
    start = timings.record("load", timings.started)
    evaluation = job.spec.evaluation
    options = EvalOptions(data=evaluation.data, tokens=evaluation.tokens, items=evaluation.items, compiled_decode=evaluation.compiled_decode)
    metrics_before = evaluate(original, task, options, reference=reference)  # default reference: the source itself
    timings.record("evaluate", start)

    inplace = job.spec.recipe.heal is None and not (task_spec(task).needs_reference and reference is original)
    result = compress(original, job.spec.recipe, executor=executor, on_layer=progress, on_heal_step=heal_progress, inplace=inplace)
    timings.stages.update({key: value for key, value in result.timings.items() if key != "compress_s"})
    start = time.perf_counter()
    compressed = result.model
    metrics_after = evaluate(compressed, task, options, reference=reference)
    start = timings.record("evaluate", start)

    # a registry alias is pinned to the version it named: the compressed model must reload the same weights later
    source = {"source": original.metadata.get("pinned_reference", job.spec.model.source), "factory": job.spec.model.factory}
    save_compressed(out_dir, compressed, source, recipe_document(result.recipe), result.tied)
    compressed.reference = f"krunch:{out_dir}"
    timings.record("save", start)
    timings.stages["total_s"] = round(time.perf_counter() - timings.started, 3)
    report = build_report(job.metadata.name, job.spec.model.source, task.value, result, metrics_before, metrics_after,
                          timings.stages, weight_files(out_dir), original.metadata.get("registry_version"))  # fmt: skip
    write_report(out_dir, report, result.budget)
    return CompressionResult(report, compressed)


def write_report(out_dir: Path, report: Report, budget: dict[str, Any] | None) -> None:
    """report.json, and for target.bytesRatio budget.json (every layer's candidates and the choice)."""
    if budget is not None:
        (out_dir / BUDGET).write_text(json.dumps(budget, indent=1) + "\n", encoding="utf-8")
    (out_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def recipe_document(recipe: Recipe) -> dict[str, Any]:
    """The recipe as the manifest and MLflow record it: the YAML's camelCase form, defaults left out."""
    return recipe.model_dump(by_alias=True, mode="json", exclude_none=True)


def bytes_target_report(budget: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """What bytesRatio achieved, measured on the built layers' stored weights (biases excluded, as in the budget);
    `model` is the compressed one (a streamed one's layers are weightless shells of the stored sizes)."""
    stored = sum(bytes_without_bias(model.get_submodule(name)) for name in budget["choices"])
    kinds: dict[str, int] = {}
    for choice in budget["choices"].values():
        kinds[choice["kind"]] = kinds.get(choice["kind"], 0) + 1
    return {"bytes_ratio": budget["bytes_ratio"], "achieved_ratio": round(stored / budget["dense_bytes"], 5),
            "layers": len(budget["choices"]), "dense_bytes": budget["dense_bytes"], "bytes_after": stored,
            "planned_bytes": budget["planned_bytes"], "choices": kinds}  # fmt: skip


def _tied_replacement(plan: Plan, name: str, original: LoadedModel, owner_replacement: torch.nn.Module) -> torch.nn.Module:
    """A tied layer gets a module of its own type that will point at the owner's quantized weight."""
    layer = next(layer for layer in plan.layers if layer.name == name)
    if layer.quantize is None:
        return original.module.get_submodule(name)
    return layer.implementation.build(layer, original.module.get_submodule(name), [], None)


def build_report(job_name: str, source: str, task: str, result: Compressed, metrics_before: dict, metrics_after: dict,
                 timings: dict[str, float], weights: list[Path], source_version: str | None = None) -> Report:  # fmt: skip
    """report.json of a compressed model: sizes before and after, the metrics given, per-layer rows, and what the
    recipe's target, healing and execution did. `krunch compress` and `krunch.register` both write it."""
    results = result.results
    bytes_after = weight_bytes(result.module)
    report: Report = {
        "job": job_name,
        "source": source,
        "source_version": source_version,  # the version a models:/ alias named when loaded
        "task": task,
        "params_before": result.source_params,
        "params_after": count_params(result.module),
        "bytes_before": result.source_bytes,
        "bytes_after": bytes_after,
        "file_bytes_after": sum(path.stat().st_size for path in weights),
        "selected_params_before": sum(r.params_before for r in results),
        "selected_params_after": sum(r.params_after for r in results),
        "metrics_before": metrics_before,
        "metrics_after": metrics_after,
        "timings": timings,
        "layers": result.layers(),
        "versions": {"krunch": __version__, "torch": torch.__version__},
        "compression_ratio": round(result.source_bytes / bytes_after, 4),
        "source_dtype": result.source_dtype,
        "execution": result.execution,
    }
    if result.source_dtype == "float32" and result.source_fp16_bytes:  # what the model people deploy would be
        report["bytes_before_fp16"] = result.source_fp16_bytes
        report["compression_ratio_vs_fp16"] = round(result.source_fp16_bytes / bytes_after, 4)
    allocated = {layer.name for layer in result.plan.allocated}
    target = result.recipe.target
    if result.budget is not None:
        report["target"] = bytes_target_report(result.budget, result.model.module)
    elif allocated and target is not None and target.param_ratio is not None:
        before = sum(r.params_before for r in results if r.name in allocated)
        after = sum(r.params_after for r in results if r.name in allocated)
        report["target"] = {"param_ratio": target.param_ratio, "achieved_ratio": round(after / before, 5),
                            "layers": len(allocated), "params_before": before, "params_after": after}  # fmt: skip
    if result.heal is not None:
        report["heal"] = result.heal.summary(result.recipe.heal)
    return report
