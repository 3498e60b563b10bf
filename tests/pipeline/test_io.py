"""Model references: user models from HF directories and weight files with a factory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from krunch.errors import ModelSourceError
from krunch.sources import load_model
from krunch.zoo import ModelKind


def test_malformed_and_unsupported_references():
    with pytest.raises(ModelSourceError, match="not a model reference"):
        load_model("smollm2")
    with pytest.raises(ModelSourceError, match="unknown reference scheme 's3'"):
        load_model("s3://bucket/model")


def test_hf_directory_errors(tmp_path):
    with pytest.raises(ModelSourceError, match="directory not found"):
        load_model(f"hf:{tmp_path / 'absent'}")
    with pytest.raises(ModelSourceError, match="no config.json"):
        load_model(f"hf:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ModelSourceError, match="no .safetensors weights"):
        load_model(f"hf:{tmp_path}")
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="found pytorch_model.bin: convert it to safetensors"):
        load_model(f"hf:{tmp_path}")


def test_file_reference_needs_a_working_factory(tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file({"weight": torch.ones(2, 2)}, weights)
    with pytest.raises(ModelSourceError, match="name a module:callable that builds it"):
        load_model(f"file:{weights}")
    with pytest.raises(ModelSourceError, match="must be written module:callable"):
        load_model(f"file:{weights}", "torch.nn.Linear")
    with pytest.raises(ModelSourceError, match="cannot import module 'no_such_pkg'"):
        load_model(f"file:{weights}", "no_such_pkg:build")
    with pytest.raises(ModelSourceError, match="has no callable 'Nothing'"):
        load_model(f"file:{weights}", "krunch.architectures.crnn:Nothing")
    with pytest.raises(ModelSourceError, match="weights do not match the architecture"):
        load_model(f"file:{weights}", "krunch.architectures.mobilenet_v2:MobileNetV2")


@pytest.mark.slow
def test_mobilenet_weights_as_a_user_file_with_factory(tmp_path, mobilenet):
    weights = tmp_path / "mobilenet.safetensors"
    save_file({k: v.contiguous() for k, v in mobilenet.module.state_dict().items()}, weights)
    user = load_model(f"file:{weights}", "krunch.architectures.mobilenet_v2:MobileNetV2")
    assert user.kind is None and not user.module.training
    image = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(user.module(image), mobilenet.module(image))


@pytest.mark.slow
def test_saved_hf_directory_loads_like_the_zoo_model(tmp_path, minilm):
    minilm.module.save_pretrained(tmp_path)
    minilm.tokenizer.save_pretrained(tmp_path)
    user = load_model(f"hf:{tmp_path}")
    assert user.kind is ModelKind.SENTENCE_EMBEDDING
    batch = minilm.tokenizer(["tensor networks"], return_tensors="pt")
    with torch.inference_mode():
        assert torch.allclose(user.module(**batch).last_hidden_state, minilm.module(**batch).last_hidden_state)


def test_factories_as_a_file_path_or_a_module_of_the_working_directory(tmp_path):
    """A console script does not put the working directory on sys.path; krunch does, as `python -m` would."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "mynet.py").write_text("import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(4, 2))\n")
    save_file({"0.weight": torch.ones(2, 4), "0.bias": torch.zeros(2)}, tmp_path / "w.safetensors")
    loaded = load_model(f"file:{tmp_path / 'w.safetensors'}", f"{tmp_path / 'mynet.py'}:build")
    assert torch.equal(loaded.module(torch.ones(1, 4)), torch.full((1, 2), 4.0))
    code = "from krunch.sources import load_model; print(load_model('file:w.safetensors', 'mynet:build').module[0].weight.sum().item())"
    cli = Path(sys.executable)
    done = subprocess.run([str(cli), "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "8.0", done.stderr
    with pytest.raises(ModelSourceError, match="no file"):
        load_model(f"file:{tmp_path / 'w.safetensors'}", f"{tmp_path / 'missing.py'}:build")
