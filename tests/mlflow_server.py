"""A real MLflow tracking server for tests: sqlite backend, artifacts served by the server, 127.0.0.1.

Job execution is off and one worker keeps it at ~0.4 GB. Every wait is bounded;
teardown terminates the server's whole process group. Set KRUNCH_TEST_MLFLOW_URI
to run the same tests against an existing server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

HOST = "127.0.0.1"
START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextmanager
def local_mlflow_server(root: Path) -> Iterator[str]:
    """Start `mlflow server`, yield its URI once /health answers, stop it (and its workers) afterwards."""
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
        "--host", HOST, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = os.environ.copy() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (root / "mlflow-server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=root)
    uri = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(uri):
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {process.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy at {uri} after {START_TIMEOUT_S} s; see {log.name}")
            time.sleep(0.5)
        yield uri
    finally:
        _stop_group(process)
        log.close()


def _healthy(uri: str) -> bool:
    try:
        return requests.get(f"{uri}/health", timeout=2).ok
    except requests.RequestException:
        return False


def _stop_group(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue
