"""Operator settings: one typed object read from the environment at start-up.

A bad value stops the operator at once with a message naming the variable,
instead of a job failing later for a reason nobody connects to the setting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from krunch.spec import Executor


class SettingsError(ValueError):
    """A setting from the environment is missing or invalid."""


@dataclass(frozen=True)
class OperatorSettings:
    ray_address: str | None  # Ray dashboard URL (Jobs API), e.g. http://ray-head:8265; a job's spec.rayAddress wins
    mlflow_tracking_uri: str | None  # passed to every job; the job registers its model there
    max_concurrent_jobs: int = 2
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    default_executor: Executor = Executor.RAY_CLUSTER
    executors: tuple[Executor, ...] = tuple(Executor)  # allowed; the Helm chart grants `rayjobs` only with rayJob on
    poll_seconds: float = 2.0  # how often a running job's status and progress are read
    submit_retries: int = 5  # Ray unreachable: retries before Failed/SubmissionFailed
    retry_delay_seconds: float = 5.0
    ray_image: str = "ghcr.io/krunch-dev/krunch-ray:0.1.0"  # image of a RayJob's ephemeral cluster
    mlflow_credentials_secret: str | None = None  # Secret whose keys become MLflow env vars in RayJob pods
    metrics_port: int = 9090  # Prometheus /metrics; 0 turns it off
    metrics_host: str = "0.0.0.0"
    health_port: int = 8080  # kopf's liveness endpoint, /healthz
    health_host: str = "0.0.0.0"
    log_level: str = "INFO"  # INFO, or DEBUG for kopf's and the clients' request logs

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if env is None else env
        return cls(
            ray_address=_url(env, "RAY_ADDRESS"),
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or None,
            max_concurrent_jobs=_number(env, "KRUNCH_MAX_CONCURRENT_JOBS", int, cls.max_concurrent_jobs, minimum=1),
            namespaces=_items(env, "KRUNCH_NAMESPACES"),
            default_executor=_executor("KRUNCH_DEFAULT_EXECUTOR", env.get("KRUNCH_DEFAULT_EXECUTOR") or cls.default_executor.value),
            executors=tuple(_executor("KRUNCH_EXECUTORS", text) for text in _items(env, "KRUNCH_EXECUTORS")) or cls.executors,
            poll_seconds=_number(env, "KRUNCH_POLL_SECONDS", float, cls.poll_seconds, minimum=0.1),
            submit_retries=_number(env, "KRUNCH_SUBMIT_RETRIES", int, cls.submit_retries, minimum=0),
            retry_delay_seconds=_number(env, "KRUNCH_RETRY_DELAY_SECONDS", float, cls.retry_delay_seconds, minimum=0.1),
            ray_image=env.get("KRUNCH_RAY_IMAGE") or cls.ray_image,
            mlflow_credentials_secret=env.get("KRUNCH_MLFLOW_CREDENTIALS_SECRET") or None,
            metrics_port=_number(env, "KRUNCH_METRICS_PORT", int, cls.metrics_port, minimum=0),
            metrics_host=env.get("KRUNCH_METRICS_HOST") or cls.metrics_host,
            health_port=_number(env, "KRUNCH_HEALTH_PORT", int, cls.health_port, minimum=1),
            health_host=env.get("KRUNCH_HEALTH_HOST") or cls.health_host,
            log_level=_log_level(env),
        )._checked()

    def _checked(self) -> OperatorSettings:
        if self.default_executor not in self.executors:
            allowed = ", ".join(e.value for e in self.executors)
            raise SettingsError(f"KRUNCH_DEFAULT_EXECUTOR={self.default_executor.value!r} is not in KRUNCH_EXECUTORS ({allowed})")
        return self


def _items(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


def _log_level(env: Mapping[str, str]) -> str:
    level = (env.get("KRUNCH_LOG_LEVEL") or "INFO").upper()
    if level not in ("INFO", "DEBUG"):
        raise SettingsError(f"KRUNCH_LOG_LEVEL={level!r}: choose INFO or DEBUG")
    return level


def _url(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name) or None
    if value is not None and not value.startswith(("http://", "https://")):
        raise SettingsError(f"{name}={value!r}: the operator talks to Ray's Jobs API, so give the dashboard URL, "
                            f"e.g. http://ray-head:8265 (not a GCS address like ray://... or host:6379)")  # fmt: skip
    return value.rstrip("/") if value else None


def _number(env: Mapping[str, str], name: str, kind: type, default: float, minimum: float) -> float:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = kind(text)
    except ValueError:
        raise SettingsError(f"{name}={text!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if value < minimum:
        raise SettingsError(f"{name}={text!r}: must be at least {minimum}")
    return value


def _executor(name: str, text: str) -> Executor:
    try:
        return Executor(text)
    except ValueError:
        raise SettingsError(f"{name}: {text!r} is not an executor; choose from {', '.join(e.value for e in Executor)}") from None
