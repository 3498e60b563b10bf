"""Loading a compressed model runs nothing its files name: a manifest's factory is lineage, not code to call,
and every malformed manifest is refused with the file and the field."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import krunch
from krunch.errors import ModelSourceError
from krunch.sources import load_model

MARKER = Path(os.environ.get("KRUNCH_TEST_MARKER", "/tmp/krunch-manifest-marker"))
FACTORY = f"{__name__}:build"


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def make_marker() -> nn.Module:
    """What an attacker's manifest would name: it leaves a file behind if it is ever called."""
    MARKER.write_text("called")
    return build()


@pytest.fixture
def saved(tmp_path) -> Path:
    torch.manual_seed(0)
    safetensors.torch.save_model(build(), str(tmp_path / "weights.safetensors"))
    source = load_model(f"file:{tmp_path / 'weights.safetensors'}", FACTORY)
    result = krunch.compress(source, {"rules": [{"match": "*", "method": "none"}], "quantize": {"bits": 8}}, progress=False)
    krunch.save(result, tmp_path / "int8")
    MARKER.unlink(missing_ok=True)
    return tmp_path / "int8"


def edit(directory: Path, change) -> Path:
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def test_the_recorded_factory_is_never_called(saved):
    edit(saved, lambda m: m["source"].update(factory=f"{__name__}:make_marker"))
    with pytest.raises(ModelSourceError, match=r"built by .*make_marker.*pass the factory"):
        load_model(f"krunch:{saved}")
    with pytest.raises(ModelSourceError, match="does not match the factory recorded"):
        krunch.load(saved, factory=FACTORY)
    assert not MARKER.exists()


def test_a_factory_given_by_the_user_rebuilds_the_model(saved):
    loaded = krunch.load(saved, factory=FACTORY)
    x = torch.randn(3, 32)
    again = load_model(f"krunch:{saved}", FACTORY).module
    assert torch.equal(loaded(x), again(x)) and type(loaded[0]).__name__ == "QuantizedLinear"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda m: m.pop("layers"), "manifest.json: layers: missing"),
        (lambda m: m.update(layers={"a": 1}), "manifest.json: layers: expected a list"),
        (lambda m: m["layers"][0].update(name=""), r"manifest.json: layers\[0\].name: no module '' in the architecture"),
        (lambda m: m["layers"][0].update(name="0.missing"), r"layers\[0\].name: no module '0.missing'"),
        (lambda m: m["layers"][0].update(type=7), r"layers\[0\].type: expected a string"),
        (lambda m: m["layers"][0]["config"].update(out_features=10**12), "does not match the manifest"),
        (lambda m: m.update(source=[]), "manifest.json: source: expected a mapping"),
    ],
)
def test_malformed_manifests_name_the_file_and_the_field(saved, change, fragment):
    edit(saved, change)
    with pytest.raises(ModelSourceError, match=fragment):
        krunch.load(saved, factory=FACTORY)


def test_a_manifest_naming_itself_as_its_source_is_refused(saved):
    edit(saved, lambda m: m.update(source={"source": f"krunch:{saved}", "factory": None}))
    with pytest.raises(ModelSourceError, match="nested more than"):
        load_model(f"krunch:{saved}")


def test_the_cli_refuses_a_manifest_factory_in_one_line(saved, tmp_path):
    import subprocess
    import sys

    edit(saved, lambda m: m["source"].update(factory=f"{__name__}:make_marker"))
    krunch_cli = Path(sys.executable).with_name("krunch")
    done = subprocess.run([str(krunch_cli), "eval", f"krunch:{saved}", "--task", "perplexity"], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "pass the factory" in done.stderr and not MARKER.exists()
    shutil.rmtree(tmp_path / "int8", ignore_errors=True)
