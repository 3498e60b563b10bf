"""The environment krunch's own programs run in (the CLI, the Ray job entry point): offline model
loading, no telemetry, bounded MLflow HTTP retries. The library never sets these; a program that
imports krunch keeps its own environment."""

from __future__ import annotations

import os

APPLICATION_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # a tracking server lost mid-run fails the command in about a minute, not after MLflow's default backoff
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


def apply_application_defaults() -> None:
    """Set each default the caller's environment leaves unset (a program's start, never a library call)."""
    for name, value in APPLICATION_DEFAULTS.items():
        os.environ.setdefault(name, value)
