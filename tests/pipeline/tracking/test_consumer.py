"""A consumer without krunch loads a registered version with `mlflow.pytorch.load_model` and gets the
compressed model's outputs exactly.

The consumer's virtual environment is a real, separate one: its site-packages
links the packages of krunch's environment except krunch itself and what only
compression needs (tensorly, Ray, kopf), so the model can rely on nothing but
what it ships (its bundled layer code) and declares (torch, transformers...).
Its working directory holds packages of its own named `pipeline` and `krunch`: the model must load its
own shipped code, not theirs, and leave them alone; a second model shipped by another krunch version
loads in the same process with its own code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import krunch
from krunch.cli import main
from krunch.registry import portable
from krunch.sources import load_model

LEFT_OUT = ("krunch", "__editable__", "tensorly", "ray", "kopf")  # distributions the consumer must not see
REGISTERED = f"minilm-int8-{uuid.uuid4().hex[:6]}"

CONSUMER = """
import importlib.util, json, sys
import torch
from safetensors.torch import load_file, save_file
for name in ("tensorly", "ray"):
    assert importlib.util.find_spec(name) is None, name + " is importable in the consumer environment"
import mlflow.pytorch
torch.set_num_threads(1)
inputs = load_file(sys.argv[1])
seen = {}
for uri, out in zip(sys.argv[2::2], sys.argv[3::2]):  # several models, one process
    model = mlflow.pytorch.load_model(uri)
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    save_file({"hidden": hidden.contiguous()}, out)
    quantized = [m for m in model.modules() if type(m).__name__ == "QuantizedTensor"]
    code = sys.modules[type(quantized[0]).__module__.split(".")[0]]
    seen[uri] = {"type": type(model).__name__, "layer_code": code.__file__, "marker": getattr(code.runtime, "MARKER", None),
                 "kernels_ran": sorted({m._packed.kernel.value for m in quantized if m._packed})}
import krunch, pipeline  # the consumer's own packages, untouched by the models
print(json.dumps({"models": seen, "consumer_packages": [krunch.MARKER, pipeline.MARKER],
                  "krunch_modules": sorted(m for m in sys.modules if m.startswith("krunch"))}))
"""


def consumer_environment(root: Path) -> Path:
    """python -m venv, then every package of this environment but those in LEFT_OUT; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True, timeout=60).stdout.strip())  # fmt: skip
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(LEFT_OUT) and not entry.name.endswith(".pth"):
            (site / entry.name).symlink_to(entry)
    return python


@pytest.fixture(scope="module")
def registered(mlflow_server, ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("consumer-job")
    document = {
        "apiVersion": "krunch.dev/v1alpha1", "kind": "CompressionJob", "metadata": {"name": "minilm-int8"},
        "spec": {"model": {"source": "zoo:minilm-l6"},
                 "recipe": {"rules": [{"match": "encoder.layer.*.intermediate.dense", "method": "tt", "rank": {"fixed": 16}},
                                      {"match": "encoder.*", "method": "none"}],
                            "quantize": {"bits": 8}},
                 "evaluation": {"task": "embedding", "items": 30}, "resources": {"workers": 2},
                 "registry": {"name": REGISTERED, "alias": "prod"}},
    }  # fmt: skip
    (root / "job.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        assert main(["compress", str(root / "job.yaml"), "--out", str(root / "out")]) == 0
    return root / "out"


def another_krunch(root: Path) -> Path:
    """The runtime as a different krunch version ships it: a copy of this one's, with a marker."""
    shutil.copytree(portable.PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    with (root / "runtime" / "__init__.py").open("a", encoding="utf-8") as init:
        init.write('\nMARKER = "another krunch"\n')
    return root


def test_consumer_without_krunch_loads_the_alias_and_gets_the_same_outputs(registered, mlflow_server, tmp_path, monkeypatch):
    compressed = load_model(f"krunch:{registered}")
    batch = compressed.tokenizer(["Tensor networks compress weight matrices.", "A short one."], padding=True, return_tensors="pt")
    inputs = {key: value.contiguous() for key, value in batch.items()}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    assert compressed.module.encoder.layer[0].attention.self.query.weight_q.kernel()[0].value == "int8pack"
    # A second registered model, shipped by "another krunch version": an int8-only recipe, in memory.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    second = krunch.compress(load_model("zoo:minilm-l6"), {"rules": [{"match": "encoder.*", "method": "none"}],
                                                           "quantize": {"bits": 8}}, progress=False)  # fmt: skip
    with monkeypatch.context() as patch:
        patch.setattr(portable, "PACKAGE_ROOT", another_krunch(tmp_path / "another"))
        krunch.register(second, f"{REGISTERED}-other", alias="prod")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the consumer: the last bits of a matmul depend on the thread count
    try:
        with torch.no_grad():
            expected = [m(**inputs).last_hidden_state for m in (compressed.module, second.module)]
    finally:
        torch.set_num_threads(threads)

    python = consumer_environment(tmp_path / "venv")
    (tmp_path / "consumer.py").write_text(CONSUMER, encoding="utf-8")
    for name in ("pipeline", "krunch"):  # the consumer's own packages of these names, beside its script
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"MARKER = 'consumer {name}'\n", encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "KRUNCH"))}
    env |= {"MLFLOW_TRACKING_URI": mlflow_server, "HF_HUB_OFFLINE": "1", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"}
    uris = [f"models:/{REGISTERED}@prod", f"models:/{REGISTERED}-other@prod"]
    outputs = [tmp_path / "first.safetensors", tmp_path / "second.safetensors"]
    result = subprocess.run(
        [str(python), str(tmp_path / "consumer.py"), str(tmp_path / "inputs.safetensors"),
         uris[0], str(outputs[0]), uris[1], str(outputs[1])],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    first, other = (loaded["models"][uri] for uri in uris)
    assert first["type"] == other["type"] == "BertModel"
    for model in (first, other):  # each model's layers run its own shipped code
        assert str(tmp_path) not in model["layer_code"] and "/code/krunch_" in model["layer_code"]
        assert "int8pack" in model["kernels_ran"]  # the consumer gets the quantized kernel, not a dequantized copy
    assert first["layer_code"] != other["layer_code"]
    assert (first["marker"], other["marker"]) == (None, "another krunch")
    assert loaded["consumer_packages"] == ["consumer krunch", "consumer pipeline"]
    assert all(name == "krunch" or name.startswith("krunch_") for name in loaded["krunch_modules"])
    for output, want in zip(outputs, expected):
        assert torch.equal(load_file(str(output))["hidden"], want)
    hidden = load_file(str(outputs[0]))["hidden"]
    with torch.no_grad():
        original = load_model("zoo:minilm-l6").module(**inputs).last_hidden_state
    assert not torch.allclose(hidden, original, atol=1e-3)  # the consumer really got the compressed model
