"""MLflow, the system of record: one run per compression, one registered version per job.

The only module that talks to MLflow's tracking API. `preflight` runs before
any compression (the server answers, the job has not been registered already);
`track` logs the run and registers the version after evaluation. Registration
is a small state machine a rerun can finish: the version is created with all its
lineage tags and `krunch.registration=pending`, then the alias is set, the run
ends, and the tag becomes `complete`. A process that dies in between (a lost
server, SIGKILL) leaves a pending version, and the next `preflight` of the same
job completes it instead of saying there is nothing to do.

The embedded sqlite store is created under a file lock, and runs of one job
identity on one sqlite store take turns, so concurrent `krunch compress` in one
directory neither corrupt the store nor register twice.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from krunch.artifact import MANIFEST, WEIGHTS_INDEX, weight_files
from krunch.results import BUDGET, REPORT, CompressionResult
from krunch.errors import KrunchError, ServiceUnavailable, require_extra
from krunch.registry.lineage import TAG_PREFIX, PRIMARY_METRIC, flatten, job_identity, quality, version_tags
from krunch.registry.portable import pickled_as, pip_requirements, runtime_code, runtime_namespace
from krunch.spec import CompressionJob

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the embedded default: a file in the working directory
EXPERIMENT = "krunch"
MODEL_NAME = "model"  # the logged model's name inside the run
PREFLIGHT_TRIES = 3
PREFLIGHT_TIMEOUT_S = 5.0
STATE_TAG = f"{TAG_PREFIX}registration"  # pending -> complete; versions from before the tag count as complete


class TrackingError(KrunchError):
    """The tracking server or registry cannot do what the job needs."""


class TrackingUnavailable(TrackingError, ServiceUnavailable):
    """The tracking server does not answer (exit status 3: retry later, the job itself is fine)."""


@dataclass(frozen=True)
class Preflight:
    tracking_uri: str
    identity: str
    existing_version: str | None  # this job's version, when an earlier attempt registered it
    completed: bool = False  # that version was left pending (the alias or the run's end missing) and is now complete


@dataclass(frozen=True)
class Tracked:
    run_id: str
    experiment_id: str
    version: str | None
    alias: str | None


MLFLOW_GLOBALS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@contextlib.contextmanager
def callers_mlflow_kept() -> Iterator[None]:
    """A library call points MLflow's fluent API at krunch's store and experiment (it knows no other way);
    afterwards the caller's tracking and registry URIs, active experiment and environment are as they were.
    MLflow keeps these in module globals (pinned in constraints.txt) mirrored into os.environ."""
    require_extra("mlflow", "mlflow", "tracking and registering models")
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    environment = {name: os.environ.get(name) for name in MLFLOW_GLOBALS}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri, fluent._active_experiment_id)
    try:
        yield
    finally:
        tracking_utils.set_tracking_uri(saved[0])  # also resets the tracer that follows the URI
        registry_utils._registry_uri, fluent._active_experiment_id = saved[1], saved[2]
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def configure() -> str:
    """Point MLflow at MLFLOW_TRACKING_URI, or at the embedded sqlite default, and make sure a server answers
    before anything is asked of it (krunch's programs also bound MLflow's HTTP retries: `krunch.app_env`)."""
    require_extra("mlflow", "mlflow", "tracking and registering models")
    import mlflow

    for logger in ("mlflow", "alembic"):  # their INFO lines (schema migrations, "registered") are krunch's to say
        logging.getLogger(logger).setLevel(logging.WARNING)

    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    wait_reachable(uri)
    if (database := sqlite_path(uri)) is not None:
        with file_lock(database.with_name(database.name + ".lock")):  # one process creates and migrates the schema
            _client().search_experiments(max_results=1)
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of an embedded sqlite store (None for a server)."""
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path`, held for the block (released if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def job_turn(uri: str, identity: str) -> Iterator[None]:
    """On an embedded sqlite store, runs of the same job wait for each other: the second then finds the first's
    version in `preflight` instead of logging a second model. A server store is shared across machines, where
    the operator runs each job once."""
    database = sqlite_path(uri)
    if database is None:
        yield
        return
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    with file_lock(database.parent / ".krunch-locks" / f"{digest}.lock"):
        yield


def use_experiment(uri: str) -> None:
    """MLFLOW_EXPERIMENT_NAME or 'krunch'; created with its artifacts next to a sqlite store's file
    (MLflow would put them under the working directory, wherever that happens to be)."""
    import mlflow

    name = experiment_name()
    client = _client()
    if client.get_experiment_by_name(name) is None:
        database = sqlite_path(uri)
        location = None if database is None else (database.parent / "mlruns").as_uri()
        client.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def wait_reachable(uri: str, tries: int = PREFLIGHT_TRIES, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> None:
    """An HTTP tracking server must answer /health within `tries` attempts (1 s, 2 s apart)."""
    import requests

    if urlparse(uri).scheme not in ("http", "https"):
        return
    started, reason = time.monotonic(), ""
    for attempt in range(tries):
        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
            if response.ok:
                return
            reason = f"HTTP {response.status_code} from /health"
        except requests.RequestException as err:
            reason = type(err).__name__ + (": connection refused" if "refused" in str(err).lower() else "")
        if attempt + 1 < tries:
            time.sleep(2**attempt)
    raise TrackingUnavailable(f"MLFLOW_TRACKING_URI={uri}", f"the tracking server did not answer after {tries} tries "
                        f"in {time.monotonic() - started:.0f} s ({reason}); start it or unset the variable to use {DEFAULT_TRACKING_URI}")  # fmt: skip


def find_version(name: str, identity: str) -> str | None:
    """The version of `name` that job `identity` registered, if any (the tag is set with the version)."""
    versions = _client().search_model_versions(f"name='{name}' and tags.`{TAG_PREFIX}job_id` = '{identity}'")
    return str(min(int(v.version) for v in versions)) if versions else None


def registry_version(name: str, version: str | None, alias: str | None) -> str:
    """The version number a parsed models:/ reference names (an alias is looked up now: aliases move)."""
    return version or str(_client().get_model_version_by_alias(name, alias).version)


def version_files_uri(name: str, version: str) -> str:
    """Where a version's model directory is stored, so that one of its folders can be fetched alone."""
    return _client().get_model_version_download_uri(name, version).rstrip("/")


def parse_models_uri(reference: str) -> tuple[str, str | None, str | None]:
    """('NAME', VERSION, None) or ('NAME', None, ALIAS)."""
    body = reference.removeprefix("models:/")
    if "@" in body:
        name, _, alias = body.partition("@")
        return name, None, alias
    name, _, version = body.rpartition("/")
    if not name or not version.isdigit():
        raise TrackingError(reference, "expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return name, version, None


def preflight(job: CompressionJob, uri: str | None = None) -> Preflight:
    """Everything about MLflow that can fail before compression starts, checked before it starts (`uri`: what
    `configure` returned, when the caller configured already)."""
    from mlflow.exceptions import MlflowException

    uri = uri or configure()
    identity = job_identity(job)
    try:
        existing = find_version(job.spec.registry.name, identity) if job.spec.registry else None
        completed = existing is not None and complete_registration(job, existing)
        if existing is None:
            fail_abandoned_runs(identity)
    except MlflowException as err:
        raise _tracking_error(uri, err) from None
    return Preflight(uri, identity, existing, completed)


def fail_abandoned_runs(identity: str) -> None:
    """Runs of this job that a dead process left RUNNING (before any version existed) are marked FAILED: this
    attempt supersedes them. Runs of one job take turns on a sqlite store (`job_turn`); on a server the
    operator runs one attempt of a resource at a time."""
    client = _client()
    experiment = client.get_experiment_by_name(experiment_name())
    if experiment is None:
        return
    for run in client.search_runs([experiment.experiment_id], f"tags.`{TAG_PREFIX}job_id` = '{identity}' and attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, f"{TAG_PREFIX}failure", "abandoned: its process ended before registering; a later attempt superseded it")
        client.set_terminated(run.info.run_id, "FAILED")


def complete_registration(job: CompressionJob, version: str) -> bool:
    """Finish what a pending version lacks (its alias, its run's end, the tag); True if anything was pending."""
    client = _client()
    registry = job.spec.registry
    found = client.get_model_version(registry.name, version)
    if found.tags.get(STATE_TAG, "complete") == "complete":
        return False
    if registry.alias:
        client.set_registered_model_alias(registry.name, registry.alias, version)
    if found.run_id and client.get_run(found.run_id).info.status == "RUNNING":
        client.set_terminated(found.run_id, "FINISHED")
    client.set_model_version_tag(registry.name, version, STATE_TAG, "complete")
    return True


def _tracking_error(uri: str, err: Exception) -> TrackingError:
    """A lost server (connection refused, retries exhausted) is a connection problem; anything else, the registry's answer."""
    reason = _mlflow_reason(err)
    lost = any(sign in reason for sign in ("Max retries exceeded", "Connection refused", "Failed to establish", "Read timed out"))
    return (TrackingUnavailable if lost else TrackingError)(f"MLFLOW_TRACKING_URI={uri}", reason)


def _mlflow_reason(err: Exception, limit: int = 300) -> str:
    """MLflow's message on one line, cut at a word boundary when long."""
    text = " ".join(str(getattr(err, "message", err)).split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def run_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Before/after numbers of the report as flat MLflow metrics."""
    metrics: dict[str, float] = {
        "params_before": report["params_before"], "params_after": report["params_after"],
        "bytes_before": report["bytes_before"], "bytes_after": report["bytes_after"],
        "file_bytes_after": report["file_bytes_after"], "compression_ratio": report["compression_ratio"],
        "selected_params_before": report["selected_params_before"], "selected_params_after": report["selected_params_after"],
    }  # fmt: skip
    if "compression_ratio_vs_fp16" in report:
        metrics["compression_ratio_vs_fp16"] = report["compression_ratio_vs_fp16"]
    for stage in ("before", "after"):
        for key, value in report[f"metrics_{stage}"].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[f"{stage}.{key}"] = value
    metrics |= {f"time.{key.removesuffix('_s')}_s": value for key, value in report["timings"].items()}
    if "target" in report:
        metrics["target.achieved_ratio"] = report["target"]["achieved_ratio"]
    if "heal" in report:
        metrics |= {f"heal.{key}": report["heal"][key] for key in ("loss_first", "loss_last", "trainable_params", "workers")}
    return {key: float(value) for key, value in metrics.items()}


def log_heal_curve(run_id: str, heal: dict[str, Any], job_name: str) -> None:
    """The distillation loss per step: a metric series (one batched call) and a plot."""
    import mlflow
    from mlflow.entities import Metric

    from krunch.registry.plots import heal_figure

    now = int(time.time() * 1000)
    series = [Metric("heal.loss", float(loss), now, step) for step, loss in enumerate(heal["losses"], start=1)]
    client = _client()
    for start in range(0, len(series), 1000):  # the tracking API's batch limit
        client.log_batch(run_id, metrics=series[start : start + 1000])
    mlflow.log_figure(heal_figure(heal["losses"], f"{job_name}: healing (distillation) loss", heal.get("batches_per_pass", 0)), "plots/heal_loss.png")


def layers_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["name"])
    writer.writeheader()
    writer.writerows({**row, "rank": row["rank"] if not isinstance(row["rank"], list) else "x".join(map(str, row["rank"]))} for row in rows)
    return out.getvalue()


def _model_files(out_dir: Path, result: CompressionResult, scratch: Path) -> list[str]:
    """The krunch reload files (manifest + safetensors, sharded or not: no pickle) and, for text models, the tokenizer."""
    index = [out_dir / WEIGHTS_INDEX] if (out_dir / WEIGHTS_INDEX).is_file() else []
    files = [str(path) for path in (out_dir / MANIFEST, *index, *weight_files(out_dir))]
    tokenizer = result.model.tokenizer
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        saved = tokenizer.save_pretrained(str(scratch / "tokenizer"))
        files += [path for path in map(str, saved) if Path(path).is_file()]
    return files


def track(job: CompressionJob, result: CompressionResult, out_dir: Path, checked: Preflight) -> Tracked:
    """Log the run (params, metrics, tables, plots, the model) and register the version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from krunch.registry.plots import layer_figure

    report = result.report
    try:
        use_experiment(checked.tracking_uri)
        run_tags = {f"{TAG_PREFIX}job_id": checked.identity, f"{TAG_PREFIX}job_name": job.metadata.name,
                    f"{TAG_PREFIX}source": job.spec.model.source}  # fmt: skip
        with mlflow.start_run(run_name=job.metadata.name, tags=run_tags) as run, tempfile.TemporaryDirectory() as scratch:
            spec = job.spec.model_dump(by_alias=True, mode="json", exclude_none=True)
            params = flatten({"source": spec["model"], "recipe": spec["recipe"], "evaluation": spec["evaluation"]})
            params = {key: value[:6000] for key, value in params.items()}
            mlflow.log_params(params)
            mlflow.log_metrics(run_metrics(report))
            document = job.model_dump(by_alias=True, mode="json", exclude_none=True)
            mlflow.log_text(yaml.safe_dump(document, sort_keys=False), "job.yaml")
            mlflow.log_dict(report, REPORT)
            if (out_dir / BUDGET).exists():  # target.bytesRatio: each layer's candidates and the choice
                mlflow.log_artifact(str(out_dir / BUDGET))
            mlflow.log_dict(report["layers"], "layers.json")
            mlflow.log_text(layers_csv(report["layers"]), "layers.csv")
            if report["layers"]:
                mlflow.log_figure(layer_figure(report["layers"], f"{job.metadata.name}: per-layer rank, size and error"),
                                  "plots/layers.png")  # fmt: skip
            if "heal" in report:
                log_heal_curve(run.info.run_id, report["heal"], job.metadata.name)
            namespace = runtime_namespace()
            with pickled_as(namespace):
                model_info = mlflow.pytorch.log_model(
                    result.model.module, name=MODEL_NAME, serialization_format="pickle",
                    code_paths=[str(runtime_code(Path(scratch) / "code", namespace))],
                    pip_requirements=pip_requirements(result.model.module),
                    extra_files=_model_files(out_dir, result, Path(scratch)),
                    metadata={"krunch_format": "krunch-compressed/1", "krunch_job_id": checked.identity,
                              "krunch_runtime": namespace},
                )  # fmt: skip
            version = None
            if job.spec.registry:
                version = register(job, model_info.model_uri, version_tags(job, report) | {STATE_TAG: "pending"})
                mlflow.set_tag(f"{TAG_PREFIX}model_version", version)
                _log_quality_size(job, report, version)
        if version is not None:  # the run has ended: the last step of the registration
            _client().set_model_version_tag(job.spec.registry.name, version, STATE_TAG, "complete")
        return Tracked(run.info.run_id, run.info.experiment_id, version, job.spec.registry.alias if job.spec.registry else None)
    except MlflowException as err:
        raise _tracking_error(checked.tracking_uri, err) from None


def register(job: CompressionJob, model_uri: str, tags: dict[str, str]) -> str:
    """One version per job identity, created together with its tags; the alias follows or the version goes."""
    import mlflow

    registry = job.spec.registry
    identity = tags[f"{TAG_PREFIX}job_id"]
    version = find_version(registry.name, identity)
    if version is None:
        version = str(mlflow.register_model(model_uri, registry.name, tags=tags).version)
        created = True
    else:
        created = False
    if registry.alias:
        try:
            _client().set_registered_model_alias(registry.name, registry.alias, version)
        except Exception:
            if created:
                _client().delete_model_version(registry.name, version)
            raise
    return version


def _log_quality_size(job: CompressionJob, report: dict[str, Any], version: str) -> None:
    """This version next to the registered model's other versions, on size and quality."""
    import mlflow

    from krunch.registry.plots import VersionPoint, quality_size_figure

    metric, before, _ = quality(report)
    if not metric:
        return
    points = []
    for other in _client().search_model_versions(f"name='{job.spec.registry.name}'"):
        tags = other.tags
        if tags.get(f"{TAG_PREFIX}quality_metric") != metric or not tags.get(f"{TAG_PREFIX}quality_after"):
            continue
        points.append(VersionPoint(str(other.version), float(tags[f"{TAG_PREFIX}bytes_after"]),
                                   float(tags[f"{TAG_PREFIX}quality_after"]), str(other.version) == version))  # fmt: skip
    baseline = (report["bytes_before"], before) if before is not None else None
    better = "higher" if PRIMARY_METRIC[report["task"]][1] else "lower"
    figure = quality_size_figure(points, baseline, f"{metric} ({better} is better)", f"{job.spec.registry.name}: quality vs size")
    mlflow.log_figure(figure, "plots/quality_vs_size.png")


def list_versions(name: str) -> list[dict[str, Any]]:
    """The versions of a registered model with their lineage, newest first, for `krunch models list`."""
    from mlflow.exceptions import MlflowException

    configure()
    try:
        client = _client()
        aliases: dict[str, list[str]] = {}
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as err:
        raise TrackingError(f"registered model {name!r}", _mlflow_reason(err)) from None
    rows = []
    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tag = {key.removeprefix(TAG_PREFIX): value for key, value in version.tags.items() if key.startswith(TAG_PREFIX)}
        rows.append({"version": str(version.version), "aliases": ",".join(sorted(aliases.get(str(version.version), []))),
                     "ratio": tag.get("compression_ratio", ""), "metric": tag.get("quality_metric", ""),
                     "before": tag.get("quality_before", ""), "after": tag.get("quality_after", ""),
                     "delta": tag.get("quality_delta", ""), "source": tag.get("source", "") + (f" (v{tag['source_version']})" if tag.get("source_version") else ""),
                     "methods": tag.get("methods", ""), "state": tag.get("registration", "complete"),
                     "run_id": version.run_id or ""})  # fmt: skip
    return rows
