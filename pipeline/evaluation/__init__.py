"""Evaluators: model -> metrics dict, one module per task, registered in `tasks` and imported when a task
first runs (each needs its own data libraries: scipy, PIL, gensim's corpora)."""

from krunch.evaluation.tasks import EvalOptions, Metrics, Task, default_task, evaluate, parse_task

__all__ = ["EvalOptions", "Metrics", "Task", "default_task", "evaluate", "parse_task"]
