"""The Kubernetes side of the operator tests: an API server to talk to, and the operator process.

`kube_api()` starts the KMock-based API server (tests/operators/kube_mock.py)
and applies the chart's CRD with the real `kubectl`; with
KRUNCH_TEST_KUBECONFIG set it uses that cluster instead (kind, k3d...), and
the same tests run unchanged. `OperatorProcess` runs the real `kopf run`.
Every wait here is bounded in time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from krunch.operator.crd import CRD_PATH

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAYJOB_CRD_PATH = Path(__file__).parent / "crds" / "rayjobs.ray.io.yaml"  # KubeRay's, for KMock
START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class KubeAPI:
    kubeconfig: Path
    apply_flags: tuple[str, ...] = ()  # KMock has no /openapi: --validate=false there
    mock: bool = False  # KMock: no controllers run (no KubeRay, no garbage collection); tests play them

    @property
    def env(self) -> dict[str, str]:
        return os.environ | {"KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        result = subprocess.run([str(BIN / "kubectl"), *args], input=input, capture_output=True, text=True,
                                env=self.env, timeout=timeout)  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def apply(self, document: dict[str, Any], namespace: str) -> None:
        self.kubectl("apply", *self.apply_flags, "-n", namespace, "-f", "-", input=yaml.safe_dump(document))

    def create_namespace(self) -> str:
        """Through the Python client: it sends JSON, where kubectl sends protobuf for built-in kinds
        (which KMock cannot read)."""
        from kubernetes import client, config

        name = f"krunch-test-{uuid.uuid4().hex[:8]}"
        with config.new_client_from_config(config_file=str(self.kubeconfig)) as api_client:
            client.CoreV1Api(api_client).create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        return name

    def get(self, name: str, namespace: str, kind: str = "compressionjobs") -> dict[str, Any] | None:
        result = self.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        if result.returncode != 0:
            if "NotFound" in result.stderr or "not found" in result.stderr.lower():
                return None
            raise AssertionError(f"kubectl get {kind} {name} failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def wait_for(self, name: str, namespace: str, predicate: Callable[[dict[str, Any] | None], bool], timeout: float,
                 what: str, interval: float = 0.5, kind: str = "compressionjobs",
                 on_poll: Callable[[dict[str, Any] | None], None] | None = None) -> dict[str, Any] | None:  # fmt: skip
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.get(name, namespace, kind)
            if on_poll:
                on_poll(last)
            if predicate(last):
                return last
            time.sleep(interval)
        status = (last or {}).get("status")
        raise AssertionError(f"{kind}/{name}: not {what} after {timeout} s; last status: {json.dumps(status)}")

    def patch_status(self, kind: str, name: str, namespace: str, status: dict[str, Any]) -> None:
        """What a controller does: a merge patch of the status subresource."""
        self.kubectl("patch", kind, name, "-n", namespace, "--subresource=status", "--type=merge",
                     "-p", json.dumps({"status": status}))  # fmt: skip

    def events(self, name: str, namespace: str) -> list[dict[str, Any]]:
        items = json.loads(self.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
        return [e for e in items if e.get("involvedObject", {}).get("name") == name]


@contextmanager
def kube_api(workdir: Path, record: Path | None = None) -> Iterator[KubeAPI]:
    """KRUNCH_TEST_KUBECONFIG's cluster, or a KMock API server on 127.0.0.1; the CRD applied either way.
    With `record`, KMock appends every resource request it serves there (tests/operators/kube_mock.py)."""
    configured = os.environ.get("KRUNCH_TEST_KUBECONFIG")
    if configured:
        api = KubeAPI(Path(configured))
        api.kubectl("apply", "-f", str(CRD_PATH))
        yield api
        return
    port = free_port()
    log = (workdir / "kube-mock.log").open("w")
    recording = ["--record", str(record)] if record else []
    process = subprocess.Popen([sys.executable, "-m", "tests.operators.kube_mock", "--port", str(port), *recording], cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_http_ok(process, f"http://127.0.0.1:{port}/version", START_TIMEOUT_S, "kube mock", lambda: f"see {log.name}")
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "users": [{"name": "kmock", "user": {"token": "kmock"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock", "namespace": "default"}}],
        }))  # fmt: skip
        api = KubeAPI(kubeconfig, apply_flags=("--validate=false",), mock=True)
        api.kubectl("apply", "--validate=false", "-f", str(CRD_PATH))
        api.kubectl("apply", "--validate=false", "-f", str(RAYJOB_CRD_PATH))
        yield api
    finally:
        _stop(process)
        log.close()


def wait_http_ok(process: subprocess.Popen, url: str, timeout: float, what: str, details: Callable[[], str]) -> None:
    """Poll `url` until it answers 200, the process exits, or `timeout` passes; `details` says where to look."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {details()}")
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready after {timeout} s: {details()}")


def _stop(process: subprocess.Popen, grace_s: float = 15) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


@dataclass
class OperatorProcess:
    """The real operator process (`python -m krunch.operator`, i.e. kopf), watching one namespace."""

    api: KubeAPI
    namespace: str
    workdir: Path
    settings: dict[str, str] = field(default_factory=dict)
    health_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        log = (self.workdir / f"operator-{self.starts}.log").open("w")
        command = [sys.executable, "-m", "operators"]  # what the chart's Deployment runs
        env = self.api.env | {"KRUNCH_NAMESPACES": self.namespace, "KRUNCH_HEALTH_PORT": str(self.health_port),
                              "KRUNCH_HEALTH_HOST": "127.0.0.1", "KRUNCH_METRICS_PORT": str(self.metrics_port),
                              "KRUNCH_METRICS_HOST": "127.0.0.1", "KRUNCH_LOG_LEVEL": "DEBUG"} | self.settings  # fmt: skip
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.wait_healthy()

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        wait_http_ok(self.process, f"http://127.0.0.1:{self.health_port}/healthz", timeout, "operator",
                     lambda: "\n" + self.log()[-3000:])  # fmt: skip

    def kill(self) -> None:
        """SIGKILL: a crash, no clean-up by the operator."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process:
            _stop(self.process)

    def log(self) -> str:
        return "".join(path.read_text(errors="replace") for path in sorted(self.workdir.glob("operator-*.log")))

    def metrics(self) -> str:
        import requests

        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text
