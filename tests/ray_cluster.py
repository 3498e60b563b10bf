"""A real Ray cluster for tests: a head node on a loopback address, started with `ray start --block`.

`ray start --node-ip-address=127.0.0.1` is rewritten to the machine's external
interface, but 127.0.0.2 sticks. Every wait is bounded; teardown terminates the
whole process group, so no Ray process outlives the session. Set
KRUNCH_TEST_RAY_ADDRESS to run the same tests against an existing cluster.
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

HEAD_IP = "127.0.0.2"
START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 30


def free_port(host: str = HEAD_IP) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@contextmanager
def local_ray_head(temp_dir: Path, cpus: int = 2, object_store_bytes: int = 2**30,
                   dashboard_port: int | None = None) -> Iterator[str]:  # fmt: skip
    """Start a head node, yield its address, and stop it (and every process it started) afterwards.
    With `dashboard_port`, the dashboard (and so the Ray Jobs API) listens there."""
    port = free_port()
    dashboard = (["--include-dashboard=true", f"--dashboard-host={HEAD_IP}", f"--dashboard-port={dashboard_port}"]
                 if dashboard_port else ["--include-dashboard=false"])  # fmt: skip
    ray_bin = Path(sys.executable).with_name("ray")
    command = [
        str(ray_bin), "start", "--head", "--block", f"--node-ip-address={HEAD_IP}", f"--port={port}",
        f"--num-cpus={cpus}", "--num-gpus=0", f"--object-store-memory={object_store_bytes}",
        *dashboard, "--disable-usage-stats", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]  # fmt: skip
    log = (temp_dir.parent / "ray-head.log").open("w")
    # Ray Jobs run `python ...` entry points in the head's environment: this interpreter's bin first
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _listening(HEAD_IP, port):
            if process.poll() is not None:
                raise RuntimeError(f"ray start exited with {process.returncode}; see {log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray head not listening on {HEAD_IP}:{port} after {START_TIMEOUT_S} s; see {log.name}")
            time.sleep(0.5)
        yield f"{HEAD_IP}:{port}"
    finally:
        _stop_group(process)
        log.close()


WORKER_IP = "127.0.0.3"


@contextmanager
def local_ray_worker(head: str, log_path: Path, cpus: int = 2, hidden: Path | None = None) -> Iterator[None]:
    """A second node joining `head` from 127.0.0.3; with `hidden`, in a mount namespace of its own where an
    empty tmpfs covers that directory (as a node without the shared volume would see it). Stopped like the head.
    Whether it has joined is for the caller to wait on (bounded), through the cluster it joined."""
    ray_bin = Path(sys.executable).with_name("ray")
    start = [str(ray_bin), "start", f"--address={head}", "--block", f"--node-ip-address={WORKER_IP}", f"--num-cpus={cpus}",
             "--num-gpus=0", "--object-store-memory=300000000", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={free_port(WORKER_IP)}", f"--metrics-export-port={free_port(WORKER_IP)}"]  # fmt: skip
    if hidden is not None:
        script = f'mount -t tmpfs -o size=1m tmpfs "{hidden}" && exec "$@"'
        start = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *start]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = log_path.open("w")
    process = subprocess.Popen(start, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        yield
    finally:
        _stop_group(process)
        log.close()


def can_hide_directories() -> bool:
    """Root with a private mount namespace and tmpfs (true here; not in most containers)."""
    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                              capture_output=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the head's process group (raylet, GCS, workers), then SIGKILL whatever is left."""
    group = process.pid
    for sig, grace_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_alive(group):
            process.poll()  # reap the ray start process itself
            time.sleep(0.2)
        if not _group_alive(group):
            break
    process.wait(timeout=10)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for_jobs_api(url: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """The dashboard starts after the GCS: wait (bounded) until its Jobs API answers."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(f"{url}/api/version", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray Jobs API not answering at {url} after {timeout_s} s")
        time.sleep(0.5)
