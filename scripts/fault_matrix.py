#!/usr/bin/env python
"""The fault table: a real `krunch compress` hit at each stage, then rerun, and what survived.

Faults: SIGINT and SIGKILL while compressing; the MLflow server lost at each registration step (a proxy in
front of a real local server stops answering right after the request that marks the step); the disk full
while the model is written (a 1 MB tmpfs as --out, where `unshare -m` may mount one). For each fault the job
runs once with it and once without, and the table says, per fault: the exit statuses, and whether the
registry ends with exactly one version of the job, the alias on it, its registration complete, no run left
RUNNING, and an output directory that loads.

    .venv/bin/python scripts/fault_matrix.py [--json docs/fault_matrix.json]   # about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.mlflow_server import free_port, local_mlflow_server  # noqa: E402

KRUNCH = Path(sys.executable).with_name("krunch")
REGISTERED = "fault-matrix"
JOB = """apiVersion: krunch.dev/v1alpha1
kind: CompressionJob
metadata: {{name: {name}}}
spec:
  model: {{source: zoo:mobilenet-v2}}
  recipe:
    rules:
      - {{match: "classifier.1", method: svd, rank: {{fixed: 64}}}}
  evaluation: {{items: 4}}
  registry: {{name: {registered}, alias: {alias}}}
"""
RUN_TIMEOUT_S = 600


class Proxy:
    """Forwards HTTP to the MLflow server until a request whose path contains `after` has been answered;
    from then on it is gone (connections refused), as a server that died at that step."""

    def __init__(self, upstream: str, port: int, after: str | None) -> None:
        self.upstream, self.after, self.tripped = upstream, after, threading.Event()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do(self) -> None:
                if proxy.tripped.is_set():  # a request on a connection opened before: the server died under it
                    self.close_connection = True
                    self.connection.close()
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                reply = requests.request(self.command, proxy.upstream + self.path, data=body, headers=headers, timeout=60)
                self.send_response(reply.status_code)
                for key, value in reply.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                self.wfile.write(reply.content)
                if proxy.after and proxy.after in self.path and reply.ok:
                    proxy.trip()

            do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = do

            def log_message(self, *args: object) -> None:
                pass

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trip(self) -> None:
        """Gone: the listening socket closes at once (new connections are refused), serving stops."""
        self.tripped.set()
        self.server.socket.close()
        threading.Thread(target=self.server.shutdown, daemon=True).start()

    def close(self) -> None:
        if not self.tripped.is_set():
            self.server.shutdown()
            self.server.server_close()


@dataclass
class Fault:
    name: str
    signal: int | None = None  # sent while compressing
    server_lost_after: str | None = None  # path fragment of the request after which the server is gone
    disk_full: bool = False


FAULTS = [
    Fault("none"),
    Fault("SIGINT while compressing", signal=signal.SIGINT),
    Fault("SIGKILL while compressing", signal=signal.SIGKILL),
    Fault("server lost before the run starts", server_lost_after="/runs/create"),
    Fault("server lost after the model is logged, before the version", server_lost_after="/logged-models/"),
    Fault("server lost after the version, before the alias", server_lost_after="/model-versions/create"),
    Fault("server lost after the alias, before the run ends", server_lost_after="/registered-models/alias"),
    Fault("server lost after the run ends, before the last tag", server_lost_after="/runs/update"),
    Fault("disk full while writing the model", disk_full=True),
]


@dataclass
class Row:
    fault: str
    first_exit: int
    rerun_exit: int
    versions: int
    alias_on_it: bool
    registration: str
    runs_left_running: int
    output_loads: bool
    staging_left: int
    first_error: str

    @property
    def survived(self) -> bool:
        return (self.rerun_exit == 0 and self.versions == 1 and self.alias_on_it and self.registration == "complete"
                and self.runs_left_running == 0 and self.output_loads and self.staging_left == 0)  # fmt: skip


def run(job: Path, out: Path, env: dict, fault: Fault, workdir: Path) -> tuple[int, str]:
    command = [str(KRUNCH), "compress", str(job), "--out", str(out)]
    if fault.disk_full:
        full = workdir / "full"
        full.mkdir(exist_ok=True)
        script = f"mount -t tmpfs -o size=1m tmpfs {full} && exec {' '.join(command[:-1])} {full}/out"
        command = ["unshare", "-m", "sh", "-c", script]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir)
    if fault.signal is not None:
        deadline = time.monotonic() + 120
        while not list(out.parent.glob(f".{out.name}.partial-*")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(4)  # into the work
        process.send_signal(fault.signal)
    _, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    lines = [line for line in stderr.splitlines() if line.startswith("krunch:")]
    return process.returncode, (lines[-1] if lines else stderr.strip()[-200:])


def check(uri: str, job_name: str, alias: str, out: Path, env: dict) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = [v for v in client.search_model_versions(f"name='{REGISTERED}'") if v.tags.get("krunch.job_name") == job_name]
    experiment = client.get_experiment_by_name("krunch")
    runs = client.search_runs([experiment.experiment_id], f"tags.`krunch.job_name` = '{job_name}'") if experiment else []
    try:
        on_alias = client.get_model_version_by_alias(REGISTERED, alias).version
    except Exception:  # noqa: BLE001 - no alias yet
        on_alias = None
    litter = sorted(p.name for p in out.parent.glob(f".{out.name}.*"))
    loads = subprocess.run([str(KRUNCH), "eval", f"krunch:{out}", "--items", "2"], capture_output=True, text=True,
                           env=env, timeout=300).returncode == 0  # fmt: skip
    return {"versions": len(versions), "alias_on_it": len(versions) == 1 and on_alias == versions[0].version,
            "registration": versions[0].tags.get("krunch.registration", "?") if len(versions) == 1 else "-",
            "runs_left_running": sum(r.info.status == "RUNNING" for r in runs), "output_loads": loads,
            "staging_left": len(litter)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "fault_matrix.json")
    parser.add_argument("--only", help="run only faults whose name contains this")
    args = parser.parse_args()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="krunch-faults-") as scratch, local_mlflow_server(Path(scratch)) as upstream:
        workdir = Path(scratch)
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        env = os.environ | {"MLFLOW_TRACKING_URI": uri, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                            "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}  # fmt: skip
        for index, fault in enumerate(f for f in FAULTS if not args.only or args.only in f.name):
            name, alias = f"fault-{index}", f"f{index}"
            job = workdir / f"{name}.yaml"
            job.write_text(JOB.format(name=name, registered=REGISTERED, alias=alias))
            out = workdir / name
            print(f"[{index + 1}/{len(FAULTS)}] {fault.name} ...", flush=True)
            proxy = Proxy(upstream, port, fault.server_lost_after)
            try:
                first_exit, first_error = run(job, out, env, fault, workdir)
            finally:
                proxy.close()
            proxy = Proxy(upstream, port, None)
            try:
                rerun_exit, _ = run(job, out, env, Fault("none"), workdir)
                found = check(uri, name, alias, out, env)
            finally:
                proxy.close()
            rows.append(Row(fault.name, first_exit, rerun_exit, first_error=first_error[:160], **found))
            print(f"    first exit {first_exit} ({first_error[:100]}), rerun exit {rerun_exit}, {found}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    documents = [asdict(r) | {"survived": r.survived} for r in rows]
    print(render(documents))
    if args.only and args.json.exists():  # a partial run replaces its rows in the full table
        fresh = {d["fault"]: d for d in documents}
        documents = [fresh.pop(d["fault"], d) for d in json.loads(args.json.read_text())] + list(fresh.values())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(documents, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(render(documents), encoding="utf-8")
    print(f"wrote {args.json}")
    return 0 if all(r.survived for r in rows) else 1


def render(documents: list[dict]) -> str:
    """docs/fault_matrix.md, from the JSON: the table the README quotes."""
    lines = ["# Fault matrix", "", "`scripts/fault_matrix.py` (MobileNetV2, SVD on its classifier, a real local MLflow server",
             "behind a proxy that stops answering after the named request); each fault once, then a clean rerun.", "",
             "| fault | first run exits | rerun exits | versions | alias on it | registration | runs left RUNNING | staging left | output loads | survived |",
             "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: | --- | --- |"]  # fmt: skip
    for d in documents:
        lines.append(f"| {d['fault']} | {d['first_exit']} | {d['rerun_exit']} | {d['versions']} | {'yes' if d['alias_on_it'] else 'no'} | "
                     f"{d['registration']} | {d['runs_left_running']} | {d['staging_left']} | {'yes' if d['output_loads'] else 'no'} | "
                     f"{'yes' if d['survived'] else '**no**'} |")  # fmt: skip
    lines += ["", "First-run messages:", ""]
    for d in documents:
        if d["first_exit"] < 0:
            lines.append(f"- {d['fault']}: killed by signal {-d['first_exit']} (no message: nothing could run)")
        elif d["first_exit"]:
            lines.append(f"- {d['fault']}: `{d['first_error']}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
