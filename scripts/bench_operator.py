#!/usr/bin/env python
"""How fast the operator reacts: apply -> Ray submission, and how far status.progress trails the job.

Runs the real operator (`kopf run`) against the KMock API server, a local Ray
head with its Jobs API and a local MLflow server (the parts the end-to-end
tests use), and creates N MiniLM int8 CompressionJobs one after another. For each:

- apply -> submission: from the create call to the API server until Ray
  accepted the job (Ray's `start_time`). Baseline, same run: a client calling
  Ray's `submit_job` directly with the same entry point and environment.
- status lag: for every progress value the job printed (its `krunch-event`
  lines carry the time), how long until it showed in the CompressionJob's
  `status.progress`, read through the Kubernetes API every 0.1 s. Baseline,
  same run: the same 0.1 s poll of the job's logs straight from Ray's Jobs
  API (what a client without the operator sees).

The operator polls each running job every `--poll-seconds` (its default, 2 s):
that interval is the lag's design bound.

    .venv/bin/python scripts/bench_operator.py [--jobs 3] [--poll-seconds 2] [--json results/bench_operator.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kubernetes import client as k8s, config as k8s_config  # noqa: E402
from ray.job_submission import JobSubmissionClient  # noqa: E402

from krunch.operator.crd import GROUP, PLURAL, VERSION  # noqa: E402
from krunch.operator.reconcile import job_document  # noqa: E402
from krunch.operator.runs import JOB_ENTRYPOINT, job_environment, submission_id  # noqa: E402
from krunch.cli import write_json  # noqa: E402
from krunch.job_events import PREFIX, parse_events  # noqa: E402
from tests.mlflow_server import local_mlflow_server  # noqa: E402
from tests.operators.cluster import OperatorProcess, kube_api  # noqa: E402
from tests.ray_cluster import HEAD_IP, free_port, local_ray_head, wait_for_jobs_api  # noqa: E402

JOB_TIMEOUT_S = 300
WATCH_INTERVAL_S = 0.1
TERMINAL = ("Succeeded", "Failed", "Cancelled")


def minilm_job(name: str, namespace: str) -> dict:
    """The end-to-end test's job: MiniLM's 36 linears to int8, evaluated on 10 pairs, registered."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "CompressionJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"model": {"source": "zoo:minilm-l6"},
                 "recipe": {"rules": [{"match": "encoder.layer.*", "method": "none"}], "quantize": {"bits": 8}},
                 "evaluation": {"items": 10}, "registry": {"name": f"bench-{namespace}-{name}", "alias": "candidate"}},
    }  # fmt: skip


def progress_times(log: str) -> dict[str, float]:
    """Each progress value the job reported -> when the job printed the event that produced it."""
    lines = [line for line in log.splitlines() if PREFIX in line]
    first: dict[str, float] = {}
    for count in range(1, len(lines) + 1):
        events = parse_events("\n".join(lines[:count]))
        if events.progress and events.progress_time is not None:
            first.setdefault(events.progress, events.progress_time)
    return first


class RayLogWatcher(threading.Thread):
    """Baseline: polls the job's logs straight from Ray and notes when each progress value first shows."""

    def __init__(self, jobs_api: str, submission_id: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.client, self.submission_id, self.stop = JobSubmissionClient(jobs_api), submission_id, stop
        self.seen: dict[str, float] = {}

    def run(self) -> None:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                progress = parse_events(self.client.get_job_logs(self.submission_id)).progress
            except RuntimeError:  # not submitted yet
                progress = None
            if progress:
                self.seen.setdefault(progress, time.time())
            time.sleep(WATCH_INTERVAL_S)


def run_one_job(api: k8s.CustomObjectsApi, jobs_api: str, namespace: str, name: str) -> dict:
    """Create one job and watch it to the end: submission latency and per-progress lags, both ways."""
    ray = JobSubmissionClient(jobs_api)
    applied = time.time()
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, minilm_job(name, namespace))
    created = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)  # KMock answers a create with no body
    sid = submission_id(created["metadata"]["uid"], 0)
    stop = threading.Event()
    direct = RayLogWatcher(jobs_api, sid, stop)
    direct.start()
    seen: dict[str, float] = {}
    status: dict = {}
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}
        if status.get("phase") == "Running" and status.get("progress"):
            seen.setdefault(status["progress"], time.time())
        if status.get("phase") in TERMINAL:
            break
        time.sleep(WATCH_INTERVAL_S)
    stop.set()
    direct.join(timeout=5)
    if status.get("phase") != "Succeeded":
        raise RuntimeError(f"{name}: {status.get('phase')} {status.get('message')}")
    printed = progress_times(ray.get_job_logs(sid))
    return {
        "name": name,
        "submission_s": ray.get_job_info(sid).start_time / 1000 - applied,
        "operator_lag_s": [seen[p] - printed[p] for p in seen if p in printed],
        "direct_lag_s": [direct.seen[p] - printed[p] for p in direct.seen if p in printed],
        "progress_values": len(printed),
        "progress_seen": len(seen),
    }


def direct_submission_s(jobs_api: str, job: dict, mlflow_uri: str) -> float:
    """Baseline: the same entry point and environment submitted straight to Ray, then stopped."""
    ray = JobSubmissionClient(jobs_api)
    called = time.time()
    sid = ray.submit_job(entrypoint=JOB_ENTRYPOINT, entrypoint_num_cpus=0,
                         runtime_env={"env_vars": job_environment(job, mlflow_uri)})  # fmt: skip
    latency = ray.get_job_info(sid).start_time / 1000 - called
    ray.stop_job(sid)
    deadline = time.monotonic() + 60
    while ray.get_job_status(sid).value not in ("STOPPED", "SUCCEEDED", "FAILED") and time.monotonic() < deadline:
        time.sleep(0.2)
    return latency


def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(ordered), "median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "max": ordered[-1]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3, help="jobs created one after another")
    parser.add_argument("--poll-seconds", type=float, default=2, help="the operator's KRUNCH_POLL_SECONDS")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    os.environ.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0")

    with tempfile.TemporaryDirectory(prefix="bench-operator-") as scratch:
        work = Path(scratch)
        for part in ("ray", "mlflow"):
            (work / part).mkdir()
        dashboard_port = free_port()
        with (local_ray_head(work / "ray" / "t", dashboard_port=dashboard_port), local_mlflow_server(work / "mlflow") as mlflow_uri,
              kube_api(work) as kube):  # fmt: skip
            jobs_api = f"http://{HEAD_IP}:{dashboard_port}"
            wait_for_jobs_api(jobs_api)
            namespace = kube.create_namespace()
            operator = OperatorProcess(kube, namespace, work, {
                "RAY_ADDRESS": jobs_api, "MLFLOW_TRACKING_URI": mlflow_uri, "KRUNCH_POLL_SECONDS": str(args.poll_seconds)})  # fmt: skip
            operator.start()
            try:
                with k8s_config.new_client_from_config(config_file=str(kube.kubeconfig)) as api_client:
                    api = k8s.CustomObjectsApi(api_client)
                    runs = []
                    for index in range(args.jobs):
                        runs.append(run_one_job(api, jobs_api, namespace, f"bench-{index}"))
                        print(f"  job {index + 1}/{args.jobs}: submitted after {runs[-1]['submission_s']:.2f} s", flush=True)
                    document = job_document(minilm_job("direct", namespace) | {"metadata": {"name": "direct", "uid": "bench"}})
                    direct = [direct_submission_s(jobs_api, document, mlflow_uri) for _ in range(args.jobs)]
            finally:
                operator.stop()

    rows = {
        "apply -> Ray submission (s)": (summarize([r["submission_s"] for r in runs]), summarize(direct)),
        "progress -> visible (s)": (summarize([lag for r in runs for lag in r["operator_lag_s"]]),
                                    summarize([lag for r in runs for lag in r["direct_lag_s"]])),
    }  # fmt: skip
    print(f"\noperator poll interval {args.poll_seconds} s; {args.jobs} MiniLM int8 jobs; watched every {WATCH_INTERVAL_S} s")
    print(f"{'measure':<30} {'operator median':>16} {'p90':>7} {'max':>7} {'direct median':>14} {'max':>7} {'ratio':>7}")
    for label, (op, base) in rows.items():
        print(f"{label:<30} {op['median']:>16.2f} {op['p90']:>7.2f} {op['max']:>7.2f} {base['median']:>14.2f} {base['max']:>7.2f}"
              f" {op['median'] / base['median']:>7.1f}")  # fmt: skip
    seen = sum(r["progress_seen"] for r in runs)
    printed = sum(r["progress_values"] for r in runs)
    print(f"progress values shown in status: {seen} of {printed} the jobs printed (the rest changed within one poll)")
    if args.json:
        result = {"poll_seconds": args.poll_seconds, "jobs": runs, "direct_submission_s": direct,
                  "summary": {label: {"operator": op, "direct": base, "ratio_of_medians": op["median"] / base["median"]}
                              for label, (op, base) in rows.items()}}  # fmt: skip
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
