"""Shared fixtures: an isolated krunch cache and the real zoo models, each loaded once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session", autouse=True)
def krunch_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory for the whole session (KRUNCH_TEST_CACHE_DIR reuses one across runs)."""
    configured = os.environ.get("KRUNCH_TEST_CACHE_DIR")
    root = Path(configured) if configured else tmp_path_factory.mktemp("krunch-cache")
    os.environ["KRUNCH_CACHE_DIR"] = str(root)
    return root


def _zoo(name: str):
    from krunch.zoo import load_zoo_model

    return load_zoo_model(name)


@pytest.fixture(scope="session")
def smollm2(krunch_cache):
    return _zoo("smollm2-135m")


@pytest.fixture(scope="session")
def minilm(krunch_cache):
    return _zoo("minilm-l6")


@pytest.fixture(scope="session")
def mobilenet(krunch_cache):
    return _zoo("mobilenet-v2")


@pytest.fixture(scope="session")
def easyocr(krunch_cache):
    return _zoo("easyocr-g2")


@pytest.fixture(scope="session")
def minilm_ffn_weight(minilm):
    """A real 1536x384 feed-forward matrix (MiniLM layer 2 intermediate)."""
    return minilm.module.encoder.layer[2].intermediate.dense.weight.detach().clone()


@pytest.fixture(scope="session")
def easyocr_conv_weight(easyocr):
    """A real 3x3 convolution kernel (EasyOCR, 128 -> 256 channels)."""
    return easyocr.module.FeatureExtraction.ConvNet[11].weight.detach().clone()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real Ray cluster this test process is connected to: a fresh local head (dashboard and Jobs API on),
    or KRUNCH_TEST_RAY_ADDRESS (with KRUNCH_TEST_RAY_DASHBOARD for the Jobs API tests)."""
    import ray

    from tests.ray_cluster import HEAD_IP, free_port, local_ray_head

    os.environ["RAY_AUTH_MODE"] = "disabled"  # the head and its clients must agree; tokens are per user home
    configured = os.environ.get("KRUNCH_TEST_RAY_ADDRESS")
    if configured:
        ray.init(address=configured)
        yield configured
        ray.shutdown()
        return
    dashboard_port = free_port()
    with local_ray_head(tmp_path_factory.mktemp("ray") / "t", dashboard_port=dashboard_port) as address:
        os.environ.setdefault("KRUNCH_TEST_RAY_DASHBOARD", f"http://{HEAD_IP}:{dashboard_port}")
        ray.init(address=address)
        try:
            yield address
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def ray_jobs_api(ray_cluster) -> str:
    """The Ray Jobs API (dashboard URL) of `ray_cluster`, once it answers."""
    from tests.ray_cluster import wait_for_jobs_api

    address = os.environ.get("KRUNCH_TEST_RAY_DASHBOARD")
    if not address:
        pytest.fail("KRUNCH_TEST_RAY_ADDRESS is set but KRUNCH_TEST_RAY_DASHBOARD (its Jobs API URL) is not")
    wait_for_jobs_api(address)
    return address


@pytest.fixture(scope="session", autouse=True)
def embedded_mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`krunch compress` tracks to MLflow by default: a session sqlite store (the embedded default's kind),
    so no test writes mlflow.db into the checkout. Tests of the server use `mlflow_server`."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow-embedded') / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
    return os.environ["MLFLOW_TRACKING_URI"]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real MLflow tracking server: a fresh local one, or KRUNCH_TEST_MLFLOW_URI."""
    configured = os.environ.get("KRUNCH_TEST_MLFLOW_URI")
    if configured:
        yield configured
        return
    from tests.mlflow_server import local_mlflow_server

    with local_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri
