"""What a registered version says about where it came from: pure functions of the job and its report.

These become MLflow version tags (and run params), so that a registry reader can
tell, without opening anything, which source and recipe produced a version, how
much smaller and how much worse it is, and which job made it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

from krunch import __version__
from krunch.spec import CompressionJob, Task

TAG_PREFIX = "krunch."
PRIMARY_METRIC = {task.value: task.primary_metric for task in Task}  # by the report's task name


def _digest(document: Any) -> str:
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


SCHEDULING_FIELDS = ("priority", "activeDeadlineSeconds", "backoffLimit", "executor", "rayAddress")


def job_identity(job: CompressionJob) -> str:
    """The Kubernetes UID when the operator runs the job; otherwise a digest of the whole job document and
    the krunch version, so that re-running the same file with the same krunch (the pipeline is
    deterministic) finds the version it made before instead of registering a duplicate."""
    uid = getattr(job.metadata, "uid", None)
    if uid:
        return f"uid:{uid}"
    document = job.model_dump(by_alias=True, mode="json", exclude_none=True)
    for field in SCHEDULING_FIELDS:  # where and when a job runs does not change what it makes
        document["spec"].pop(field, None)
    return f"spec:{_digest([document, __version__])}"


def recipe_hash(job: CompressionJob) -> str:
    return _digest(job.spec.recipe.model_dump(by_alias=True, mode="json", exclude_none=True))


def method_summary(job: CompressionJob, report: dict[str, Any]) -> str:
    """e.g. 'svd x90, none x120; int8': layers per method, then the default quantization."""
    counts = Counter(row["method"] for row in report["layers"])
    methods = ", ".join(f"{method} x{count}" for method, count in counts.most_common())
    quantize = job.spec.recipe.quantize
    return f"{methods}; int{quantize.bits}" if quantize else methods


def quality(report: dict[str, Any]) -> tuple[str, float | None, float | None]:
    """(metric, before, after) for the task's primary metric."""
    metric, _ = PRIMARY_METRIC.get(report["task"], ("", True))
    return metric, report["metrics_before"].get(metric), report["metrics_after"].get(metric)


def quality_delta(report: dict[str, Any]) -> float | None:
    """Relative change of the primary metric, signed so that negative is always worse."""
    metric, before, after = quality(report)
    if before is None or after is None or before == 0:
        return None
    higher_is_better = PRIMARY_METRIC[report["task"]][1]
    change = (after - before) / abs(before)
    return round(change if higher_is_better else -change, 6)


def version_tags(job: CompressionJob, report: dict[str, Any]) -> dict[str, str]:
    """Tags set on the registered version in the same call that creates it."""
    metric, before, after = quality(report)
    delta = quality_delta(report)
    tags = {
        "source": job.spec.model.source,
        "source_version": report.get("source_version") or "",
        "recipe_hash": recipe_hash(job),
        "methods": method_summary(job, report),
        "compression_ratio": f"{report['compression_ratio']}",
        "source_dtype": report.get("source_dtype", "float32"),
        "compression_ratio_vs_fp16": f"{report.get('compression_ratio_vs_fp16', '')}",
        "bytes_after": str(report["bytes_after"]),
        "quality_metric": metric,
        "quality_before": "" if before is None else f"{before}",
        "quality_after": "" if after is None else f"{after}",
        "quality_delta": "" if delta is None else f"{delta}",
        "krunch_version": __version__,
        "job_name": job.metadata.name,
        "job_id": job_identity(job),
        "k8s_uid": str(getattr(job.metadata, "uid", "") or ""),
    }
    return {f"{TAG_PREFIX}{key}": value for key, value in tags.items()}


def flatten(document: Any, prefix: str = "") -> dict[str, str]:
    """Nested spec -> MLflow params: {'recipe.rules.0.method': 'svd', ...} (MLflow keys take no brackets)."""
    if isinstance(document, dict):
        flat: dict[str, str] = {}
        for key, value in document.items():
            flat |= flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return flat
    if isinstance(document, list):
        flat = {}
        for index, value in enumerate(document):
            flat |= flatten(value, f"{prefix}.{index}")
        return flat
    return {prefix: json.dumps(document) if not isinstance(document, str) else document}
