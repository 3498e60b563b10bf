"""Evaluation tasks: each a function (model, options, reference) -> metrics, registered by decorator."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from krunch.errors import KrunchError
from krunch.model import LoadedModel, ModelKind
from krunch.spec import Task

Metrics = dict[str, float | int | str]


@dataclass(frozen=True)
class EvalOptions:
    """Knobs shared by the tasks; each task reads the ones it understands."""

    data: str | None = None  # text corpus for perplexity: `wikipedia`, `news` or `file:PATH`
    tokens: int = 4096  # perplexity token budget (evaluation split)
    window: int = 512  # perplexity window, non-overlapping
    items: int | None = None  # cap on words / crops / documents, for quick runs
    batch_size: int = 16
    compiled_decode: bool = False  # causal LMs: also decode through greedy_decode's compiled step (compiles per model)
    streamed: bool = False  # the model reads its weights on every call (krunch.streaming): no speed figures, small logits chunks


Evaluator = Callable[[LoadedModel, EvalOptions, LoadedModel | None], Metrics]


@dataclass(frozen=True)
class TaskSpec:
    task: Task
    kind: ModelKind
    needs_reference: bool
    run: Evaluator


_TASKS: dict[Task, TaskSpec] = {}
_MODULES = {Task.PERPLEXITY: "perplexity", Task.EMBEDDING: "embedding", Task.OCR: "ocr", Task.IMAGE_AGREEMENT: "image_agreement"}


def task_spec(task: Task) -> TaskSpec:
    """The task's evaluator, its module imported on first use."""
    if task not in _TASKS:
        importlib.import_module(f"krunch.evaluation.{_MODULES[task]}")
    return _TASKS[task]


def evaluator(task: Task, kind: ModelKind, needs_reference: bool = False) -> Callable[[Evaluator], Evaluator]:
    def decorator(run: Evaluator) -> Evaluator:
        _TASKS[task] = TaskSpec(task, kind, needs_reference, run)
        return run

    return decorator


def parse_task(name: str) -> Task:
    try:
        return Task(name)
    except ValueError:
        raise KrunchError("--task", f"unknown task {name!r}; choose one of {', '.join(t.value for t in Task)}") from None


def default_task(model: LoadedModel) -> Task:
    for spec in map(task_spec, Task):
        if spec.kind is model.kind:
            return spec.task
    raise KrunchError(model.reference, "no default evaluation task for this model; pass --task")


def evaluate(
    model: LoadedModel, task: Task, options: EvalOptions = EvalOptions(), reference: LoadedModel | None = None
) -> Metrics:
    """Run one task; a model with no kind (a bare module from a factory) is fed as the task expects."""
    spec = task_spec(task)
    if model.kind is not None and model.kind is not spec.kind:
        raise KrunchError(
            model.reference, f"task {task.value} needs a {spec.kind.value} model, this is a {model.kind.value}"
        )
    if reference is None and spec.needs_reference:
        if model.kind is None:
            raise KrunchError(model.reference, f"task {task.value} compares with a reference model; give one (krunch eval --reference; "
                                              "a job compares with its source)")
        reference = model
    return spec.run(model, options, reference)
