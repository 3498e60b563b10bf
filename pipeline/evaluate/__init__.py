"""Evaluators: model -> metrics dict, one module per task, registered in `tasks`."""

from pipeline.evaluate import embedding, image_agreement, ocr, perplexity  # noqa: F401  (registers the tasks)
from pipeline.evaluate.tasks import EvalOptions, Metrics, Task, default_task, evaluate, parse_task

__all__ = ["EvalOptions", "Metrics", "Task", "default_task", "evaluate", "parse_task"]
