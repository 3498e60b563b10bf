"""A consumer without krunch loads a registered version with `mlflow.pytorch.load_model` and gets the
compressed model's outputs exactly.

The consumer's virtual environment is a real, separate one: its site-packages
links the packages of krunch's environment except krunch itself and what only
compression needs (tensorly, Ray, kopf), so the model can rely on nothing but
what it ships (its bundled layer code) and declares (torch, transformers...).
Its working directory holds packages of its own named `pipeline` and `krunch`: the model must load its
own shipped code, not theirs, and leave the consumer's `pipeline` alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from krunch.cli import main
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
model = mlflow.pytorch.load_model(sys.argv[1])
torch.set_num_threads(1)
with torch.no_grad():
    hidden = model(**load_file(sys.argv[2])).last_hidden_state
save_file({"hidden": hidden.contiguous()}, sys.argv[3])
import pipeline  # the consumer's own package, untouched by the model
ran = sorted({m._packed.kernel.value for m in model.modules() if type(m).__name__ == "QuantizedTensor" and m._packed})
print(json.dumps({"type": type(model).__name__, "layer_code": sys.modules["krunch"].__file__,
                  "consumer_pipeline": pipeline.MARKER, "kernels_ran": ran,
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


def test_consumer_without_krunch_loads_the_alias_and_gets_the_same_outputs(registered, mlflow_server, tmp_path):
    compressed = load_model(f"krunch:{registered}")
    batch = compressed.tokenizer(["Tensor networks compress weight matrices.", "A short one."], padding=True, return_tensors="pt")
    inputs = {key: value.contiguous() for key, value in batch.items()}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    assert compressed.module.encoder.layer[0].attention.self.query.weight_q.kernel()[0].value == "int8pack"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the consumer: the last bits of a matmul depend on the thread count
    try:
        with torch.no_grad():
            expected = compressed.module(**inputs).last_hidden_state
    finally:
        torch.set_num_threads(threads)

    python = consumer_environment(tmp_path / "venv")
    (tmp_path / "consumer.py").write_text(CONSUMER, encoding="utf-8")
    for name in ("pipeline", "krunch"):  # the consumer's own packages of these names, beside its script
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"MARKER = 'consumer {name}'\n", encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "KRUNCH"))}
    env |= {"MLFLOW_TRACKING_URI": mlflow_server, "HF_HUB_OFFLINE": "1", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "true"}
    result = subprocess.run(
        [str(python), str(tmp_path / "consumer.py"), f"models:/{REGISTERED}@prod", str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["type"] == "BertModel"
    assert str(tmp_path) not in loaded["layer_code"] and "/code/krunch/" in loaded["layer_code"]  # shipped with the model
    assert loaded["consumer_pipeline"] == "consumer pipeline"
    assert "int8pack" in loaded["kernels_ran"]  # the consumer gets the quantized kernel, not a dequantized copy
    assert all(name == "krunch" or name.startswith(("krunch.runtime", "krunch.architectures")) for name in loaded["krunch_modules"])
    hidden = load_file(str(tmp_path / "out.safetensors"))["hidden"]
    assert torch.equal(hidden, expected)
    with torch.no_grad():
        original = load_model("zoo:minilm-l6").module(**inputs).last_hidden_state
    assert not torch.allclose(hidden, original, atol=1e-3)  # the consumer really got the compressed model
