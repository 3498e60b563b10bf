"""krunch from Python: compress a model you hold in memory, then save, load or evaluate it.

    >>> import krunch, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    >>> result = krunch.compress(model, {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8}}, progress=False)
    >>> print(result.module[0])
    QuantizedLinear(
      method=none, in_features=64, out_features=128, bias=True, int8, kernel=int8pack
      (weight_q): QuantizedTensor(shape=(128, 64), int8, per-channel, sym, nearest, kernel=int8pack)
    )
    >>> result.module(torch.randn(1, 64)).shape
    torch.Size([1, 64])

The CLI, the Ray job entry point and the benchmarks call these same functions; `krunch.save` and
`krunch.load` live in `krunch.store`, which loading a model needs without the compression stack.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from krunch.artifact import MEMORY
from krunch.calibration.grams import Batch
from krunch.run import allocate_target, assembled, compress_layers, heal_stage
from krunch.execution.layer import LayerResult
from krunch.execution.executors import Executor, InProcessExecutor, ProgressCallback, RayExecutor
from krunch.errors import KrunchError
from krunch.execution.heal import HealResult, StepCallback
from krunch.model import LoadedModel, ModelKind
from krunch.plan import Plan, make_plan
from krunch.plan.profile import DEFAULT_MAX_ERROR
from krunch.sizes import count_params, float_dtype, weight_bytes
from krunch.spec import Calibration, Recipe, Resources, SpecError
from krunch.store import load, save  # noqa: F401  (part of this API)

log = logging.getLogger("krunch")


@dataclass
class Compressed:
    """A compressed model, usable at once, and what was done to it (per layer, the allocation, healing)."""

    model: LoadedModel
    recipe: Recipe
    plan: Plan
    results: list[LayerResult]
    tied: dict[str, str]
    execution: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] | None = None  # target.bytesRatio: every layer's candidates and the one chosen
    heal: HealResult | None = None
    timings: dict[str, float] = field(default_factory=dict)
    source_params: int = 0  # the original's, for the report `krunch.register` records
    source_bytes: int = 0
    source_dtype: str = "float32"
    source_fp16_bytes: int = 0  # the source with its floats in 16 bits: what an fp32 source is also compared with

    @property
    def module(self) -> nn.Module:
        return self.model.module

    def layers(self) -> list[dict[str, Any]]:
        """One row per selected layer: method, rank, parameters before and after, weight error, kernel."""
        return [result.row() for result in self.results]


def as_recipe(recipe: Recipe | dict | str) -> Recipe:
    """A recipe object, a dict in the YAML's camelCase form, or YAML text."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        from krunch.spec import safe_yaml_documents

        documents = safe_yaml_documents(recipe, "recipe")
        if len(documents) != 1:
            raise SpecError("recipe", f"expected one recipe document in the YAML text, found {len(documents)}")
        recipe = documents[0]
    if not isinstance(recipe, dict):
        raise SpecError("recipe", f"must be a Recipe, a mapping or YAML text of one, got {type(recipe).__name__}")
    from pydantic import ValidationError

    from krunch.spec import spec_error

    try:
        return Recipe.model_validate(recipe)
    except ValidationError as err:
        raise spec_error(err, ("recipe",)) from None


def model_kind(module: nn.Module, tokenizer: Any) -> ModelKind | None:
    """How evaluation and calibration corpora feed a model handed over in memory (None: a plain module)."""
    if type(module).__module__.startswith("transformers.") and tokenizer is not None:
        if type(module).__name__.endswith("ForCausalLM"):
            return ModelKind.CAUSAL_LM
        return ModelKind.SENTENCE_EMBEDDING
    return None


def as_loaded(model: nn.Module | LoadedModel, tokenizer: Any = None, kind: str | None = None,
              preprocess: Callable[[Any], torch.Tensor] | None = None) -> LoadedModel:  # fmt: skip
    """kind: what a plain module is (image-classifier: fed photo crops through `preprocess`, default the
    ImageNet eval transform); transformers models with a tokenizer are recognised by themselves."""
    if isinstance(model, LoadedModel):
        return model
    if not isinstance(model, nn.Module):
        raise KrunchError("model", f"must be a torch.nn.Module (or a model krunch loaded), got {type(model).__name__}")
    loaded = LoadedModel(f"{MEMORY}{type(model).__name__}", model, model_kind(model, tokenizer), tokenizer, preprocess)
    if kind is not None:
        from pydantic import ValidationError

        from krunch.sources.stated import stated
        from krunch.spec import ModelSource

        try:
            source = ModelSource(source=loaded.reference, kind=kind)
        except ValidationError as err:
            raise KrunchError("kind", err.errors()[0]["msg"].removeprefix("Value error, ")) from None
        stated(loaded, source, "kind")
    elif preprocess is not None and loaded.kind is None:
        raise KrunchError("preprocess", "says how pictures become an image classifier's inputs: pass kind='image-classifier' too")
    return loaded


def calibration_inputs(items: Iterable[Any], tokenizer: Any) -> list[Batch]:
    """User calibration data as (args, kwargs) batches: texts (tokenized one by one), dicts of model
    keyword arguments, tuples of positional arguments, or single input tensors."""
    batches: list[Batch] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            if tokenizer is None:
                raise KrunchError(f"calibration[{index}]", "texts need the model's tokenizer: pass tokenizer=")
            encoded = tokenizer(item, return_tensors="pt")
            batches.append(((), {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}))
        elif isinstance(item, dict):
            batches.append(((), dict(item)))
        elif isinstance(item, tuple):
            batches.append((item, {}))
        elif isinstance(item, torch.Tensor):
            batches.append(((item,), {}))
        else:
            raise KrunchError(f"calibration[{index}]", f"must be a text, a dict of inputs, a tuple or a tensor, got {type(item).__name__}")
    if not batches:
        raise KrunchError("calibration", "is empty: give at least one input")
    return batches


def default_executor() -> Executor:
    """In this process, unless RAY_ADDRESS names a cluster to run the layer tasks on."""
    return RayExecutor.from_resources(Resources()) if os.environ.get("RAY_ADDRESS") else InProcessExecutor()


def compress(model: nn.Module | LoadedModel, recipe: Recipe | dict | str, *, calibration: Iterable[Any] | str | None = None,
             tokenizer: Any = None, kind: str | None = None, preprocess: Callable[[Any], torch.Tensor] | None = None,
             executor: Executor | None = None, progress: bool = True, on_layer: ProgressCallback | None = None,
             on_heal_step: StepCallback | None = None, inplace: bool = False) -> Compressed:  # fmt: skip
    """Compress `model` by `recipe`; the original is left as it was unless `inplace`.

    calibration: inputs for activation-aware layers, gptq rounding, propagation and healing (texts with
    `tokenizer`, dicts of keyword arguments, tuples or tensors), or the name of a corpus krunch knows
    (`wikipedia`); default: the recipe's own calibration section, for the model kinds krunch knows.
    kind, preprocess: what a plain module is and how pictures become its inputs (`as_loaded`).
    executor: where the layer tasks run (default: here, or on Ray when RAY_ADDRESS is set).
    inplace: install the compressed layers in `model` itself rather than in a copy, so memory never holds the
    model twice; the original layers are gone afterwards (refused with `recipe.heal`, whose teacher they are).
    """
    started = time.perf_counter()
    recipe = as_recipe(recipe)
    if inplace and recipe.heal is not None:
        raise KrunchError("inplace", "recipe.heal distils towards the original model, which compressing in place replaces; "
                          "compress a copy (inplace=False)")  # fmt: skip
    original = as_loaded(model, tokenizer, kind, preprocess)
    if isinstance(calibration, str):
        recipe = recipe.model_copy(update={"calibration": (recipe.calibration or Calibration()).model_copy(update={"data": calibration})})
    elif calibration is not None:
        original = dataclasses.replace(original, calibration_inputs=calibration_inputs(calibration, tokenizer or original.tokenizer))
    plan = make_plan(original.module, recipe)  # a recipe that does not fit the model fails before any work
    for why, names in plan.skipped_reasons().items():
        log.warning("krunch: %d module(s) left as they are (e.g. %s): %s", len(names), names[0], why)
    needs_data = recipe.uses_calibration or recipe.heal is not None
    if needs_data and original.kind is None and original.calibration_inputs is None:
        raise KrunchError("calibration", "this recipe fits layers to calibration data (activationAware, gptq, a fitted grid, heal); "
                          "pass calibration= inputs for this model")  # fmt: skip
    executor = executor or default_executor()
    timings: dict[str, float] = {}
    source = {"source_params": count_params(original.module), "source_bytes": weight_bytes(original.module),  # before any swap
              "source_dtype": float_dtype(original.module), "source_fp16_bytes": weight_bytes(original.module, float_bytes=2)}  # fmt: skip
    with executor.session():
        allocation = allocate_target(recipe, original, plan, executor)
        timings["plan_s"] = round(time.perf_counter() - started, 3)
        execution = compress_layers(recipe, executor, original, allocation.plan, allocation.ranks, on_layer, progress)
        warn_destroyed(execution.results)
        compressed, tied = assembled(original, allocation.plan, execution.results, inplace=inplace)
        timings["decompose_s"] = round(time.perf_counter() - started - timings["plan_s"], 3)
        healed = None
        if recipe.heal is not None:
            healing = time.perf_counter()
            healed = heal_stage(recipe, executor, compressed, original, on_heal_step, progress)
            timings["heal_s"] = round(time.perf_counter() - healing, 3)
    timings["compress_s"] = round(time.perf_counter() - started, 3)
    return Compressed(compressed, recipe, allocation.plan, execution.results, tied, execution.info, allocation.budget, healed,
                      timings, **source)


def warn_destroyed(results: list[LayerResult]) -> None:
    """Say which layers came out with almost none of their weight left (a fixed rank far too small, a flat
    spectrum): one such layer can ruin a model that every other number says is fine."""
    high = sorted(((r.rel_error, r.name) for r in results if r.rel_error is not None and r.rel_error > DEFAULT_MAX_ERROR), reverse=True)
    if high:
        listed = ", ".join(f"{name} ({error:.3f})" for error, name in high[:5])
        log.warning("krunch: %d layer(s) above %.1f relative weight error: %s", len(high), DEFAULT_MAX_ERROR, listed)


def evaluate(model: nn.Module | LoadedModel, task: str, *, tokenizer: Any = None, reference: nn.Module | LoadedModel | None = None,
             data: str | None = None, tokens: int | None = None, items: int | None = None, kind: str | None = None,
             preprocess: Callable[[Any], torch.Tensor] | None = None, compiled_decode: bool = False) -> dict[str, Any]:  # fmt: skip
    """Quality and speed on one of krunch's tasks (perplexity, embedding, ocr, image-agreement); a plain
    `reference` module is fed as the model is. compiled_decode: a causal LM also decodes through
    `krunch.runtime.greedy_decode` (one compiled step per token; compiling takes tens of seconds)."""
    from krunch.evaluation import EvalOptions
    from krunch.evaluation import evaluate as run_task
    from krunch.evaluation import parse_task

    options = EvalOptions(data=data, items=items, compiled_decode=compiled_decode, **({"tokens": tokens} if tokens else {}))
    loaded = as_loaded(model, tokenizer, kind, preprocess)
    same_kind = kind or (loaded.kind.value if loaded.kind else None)
    against = as_loaded(reference, tokenizer, same_kind, preprocess or loaded.preprocess) if reference is not None else None
    return run_task(loaded, parse_task(task), options, against)


def register(compressed: Compressed, name: str, *, alias: str | None = None, metrics: dict[str, dict[str, Any]] | None = None,
             task: str | None = None, job_name: str | None = None) -> str:  # fmt: skip
    """Log `compressed` as an MLflow run (recipe, per-layer table, the model a consumer loads with
    `mlflow.pytorch.load_model`) and register it as a new version of `name`, in MLFLOW_TRACKING_URI or
    ./mlflow.db; returns the version. metrics: {"before": {...}, "after": {...}}, e.g. from `krunch.evaluate`;
    task: what they measured, so the version records its primary metric."""
    import json
    import tempfile
    import uuid
    from pathlib import Path

    from krunch.artifact import weight_files
    from krunch.registry.tracking import callers_mlflow_kept, preflight, track
    from krunch.results import REPORT, CompressionResult
    from krunch.run import build_report, recipe_document
    from krunch.spec import API_VERSION, KIND, Task, parse_job

    metrics = metrics or {}
    unknown = set(metrics) - {"before", "after"}
    if unknown:
        raise KrunchError("metrics", f"takes 'before' and 'after' only, got {', '.join(sorted(unknown))}")
    if task is not None and task not in {t.value for t in Task}:
        raise KrunchError("task", f"unknown task {task!r}; choose one of {', '.join(t.value for t in Task)}")
    document = {
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": {"name": job_name or _dns_name(name), "uid": str(uuid.uuid4())},  # each call: a version of its own
        "spec": {"model": {"source": compressed.model.reference}, "recipe": recipe_document(compressed.recipe),
                 "registry": {"name": name, **({"alias": alias} if alias else {})}},
    }  # fmt: skip
    job = parse_job(document, "krunch.register")
    with tempfile.TemporaryDirectory(prefix="krunch-register-") as scratch:
        out = Path(scratch) / "model"
        save(compressed, out)
        report = build_report(job.metadata.name, compressed.model.reference, task or "", compressed, dict(metrics.get("before", {})),
                              dict(metrics.get("after", {})), dict(compressed.timings), weight_files(out))  # fmt: skip
        (out / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        with callers_mlflow_kept():
            tracked = track(job, CompressionResult(report, compressed.model), out, preflight(job))
    assert tracked.version is not None
    return tracked.version


def _dns_name(name: str) -> str:
    """A Kubernetes-style job name from a registered model name (letters lowered, others to '-')."""
    import re

    cleaned = re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-.")
    return re.sub(r"\.\.+", ".", cleaned)[:200] or "registered"
