"""`krunch.register` on a model compressed in memory: a run and a version on a real MLflow server, loadable
by a consumer with mlflow alone."""

from __future__ import annotations

import os
import uuid

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

import krunch
from krunch.errors import KrunchError
from krunch.registry.tracking import STATE_TAG


def test_register_an_in_memory_model_and_load_it_back_through_mlflow(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    result = krunch.compress(model, {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8}}, progress=False)
    name = f"in-memory-{uuid.uuid4().hex[:6]}"
    metrics = {"before": {"perplexity": 20.0}, "after": {"perplexity": 20.5}}
    environment = dict(os.environ)
    first = krunch.register(result, name, alias="candidate", metrics=metrics, task="perplexity")
    second = krunch.register(result, name, alias="candidate")  # every call is a version of its own
    assert (first, second) == ("1", "2")
    assert dict(os.environ) == environment  # a library call leaves the program's environment alone

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    version = client.get_model_version(name, "1")
    assert version.tags[STATE_TAG] == "complete" and version.tags["krunch.quality_metric"] == "perplexity"
    assert version.tags["krunch.quality_after"] == "20.5" and version.tags["krunch.source"].startswith("memory:")
    assert float(version.tags["krunch.compression_ratio"]) > 3.5  # fp32 -> int8 codes and scales
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["after.perplexity"] == 20.5
    assert client.get_model_version_by_alias(name, "candidate").version == "2"

    mlflow.set_tracking_uri(mlflow_server)
    consumer = mlflow.pytorch.load_model(f"models:/{name}/1")
    x = torch.randn(4, 64)
    assert torch.equal(consumer(x), result.module(x))


def test_register_refuses_what_it_cannot_record():
    result = krunch.compress(nn.Sequential(nn.Linear(8, 8)), {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8}},
                             progress=False)  # fmt: skip
    with pytest.raises(KrunchError, match="metrics: takes 'before' and 'after' only"):
        krunch.register(result, "x", metrics={"during": {}})
    with pytest.raises(KrunchError, match="unknown task 'bleu'"):
        krunch.register(result, "x", task="bleu")
    with pytest.raises(KrunchError, match="spec.registry.name"):
        krunch.register(result, "bad/name")
