"""The entry point a Ray job runs: one CompressionJob in, a registered model version out.

    KRUNCH_JOB='{"apiVersion": ..., "metadata": {"name": ..., "uid": ...}, "spec": {...}}' python -m krunch.job

The operator submits this through the Ray Jobs API (or a KubeRay RayJob). The
job is the same pipeline `krunch compress` runs; it reports through
`krunch-event` lines (krunch.job_events) and is idempotent: the version it
registers carries the resource's UID, so a resubmission finds it and stops.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from krunch.app_env import apply_application_defaults
from krunch.errors import KrunchError
from krunch.job_events import emit
from krunch.spec import CompressionJob, SpecError, parse_job

JOB_ENV = "KRUNCH_JOB"
HEAL_EVENT_S = 2.0  # the operator polls every few seconds: more events would only grow the log


def read_job() -> CompressionJob:
    text = os.environ.get(JOB_ENV)
    if not text:
        raise SpecError(JOB_ENV, "not set: the job document (JSON) goes in this environment variable")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise SpecError(JOB_ENV, f"not valid JSON ({err})") from None
    return parse_job(document, JOB_ENV)


def run(job: CompressionJob, out_dir: Path) -> dict:
    """Compress, track and register; return the result event's payload."""
    from krunch.run import run_compression
    from krunch.registry.lineage import quality
    from krunch.registry.tracking import preflight, track

    emit("stage", stage="preflight")
    checked = preflight(job)
    if checked.existing_version:  # an earlier submission of this resource finished: report it, do nothing
        return {"modelVersion": checked.existing_version, "identity": checked.identity, "reused": True}

    healing = job.spec.recipe.heal is not None
    last_heal_event = [0.0]

    def progress(done: int, total: int, _layer: str) -> None:
        emit("progress", done=done, total=total)
        if done == total:
            emit("stage", stage="heal" if healing else "evaluate")

    def heal_progress(step: int, steps: int, loss: float) -> None:
        """At most one event every HEAL_EVENT_S (a GPU takes many steps a second), and always the last."""
        now = time.monotonic()
        if step == steps or now - last_heal_event[0] >= HEAL_EVENT_S:
            last_heal_event[0] = now
            emit("stage", stage=f"heal {step}/{steps} steps, loss {loss:.4g}")
        if step == steps:
            emit("stage", stage="evaluate")

    emit("stage", stage="compress")
    result = run_compression(job, out_dir, progress=progress, heal_progress=heal_progress)
    emit("stage", stage="register")
    tracked = track(job, result, out_dir, checked)
    metric, before, after = quality(result.report)
    return {
        "mlflowRunId": tracked.run_id, "modelVersion": tracked.version, "alias": tracked.alias, "identity": checked.identity,
        "compressionRatio": result.report["compression_ratio"], "qualityMetric": metric,
        "qualityBefore": before, "qualityAfter": after, "reused": False,
    }  # fmt: skip


def main() -> int:
    apply_application_defaults()
    try:
        job = read_job()
        emit("started", name=job.metadata.name)
        with tempfile.TemporaryDirectory(prefix=f"krunch-{job.metadata.name}-") as out:
            emit("result", **run(job, Path(out)))
        return 0
    except KrunchError as err:
        emit("error", subject=err.subject, reason=err.reason)
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
