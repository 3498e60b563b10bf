"""Evaluators: model -> metrics dict, one module per task, registered in `tasks`."""

from krunch.evaluation import embedding, image_agreement, ocr, perplexity  # noqa: F401  (registers the tasks)
from krunch.evaluation.tasks import EvalOptions, Metrics, Task, default_task, evaluate, parse_task

__all__ = ["EvalOptions", "Metrics", "Task", "default_task", "evaluate", "parse_task"]
