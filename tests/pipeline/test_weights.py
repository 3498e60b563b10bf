"""Weight files: safe formats load, anything that needs real unpickling is refused unrun."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from krunch.errors import ModelSourceError, UnsafeCheckpointError
from krunch.sources.weights import load_strict, read_state_dict, strip_prefix


class _SideEffect:
    """Unpickling this would create a file: proof of code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_safetensors_and_torch_state_dicts_load(tmp_path):
    state = {"weight": torch.randn(3, 2), "bias": torch.randn(3)}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    for name in ("w.safetensors", "w.pt", "wrapped.pth"):
        loaded = read_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_pickled_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"
    torch.save({"weight": torch.zeros(2), "payload": _SideEffect(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="pickled Python objects"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_plain_pickle_with_non_tensor_values_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(2), "note": "hello"}, tmp_path / "mixed.pt")
    with pytest.raises(UnsafeCheckpointError, match="'note' is a str"):
        read_state_dict(tmp_path / "mixed.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(UnsafeCheckpointError, match="got list"):
        read_state_dict(tmp_path / "list.pt")
    with open(tmp_path / "raw.pkl.pt", "wb") as f:
        pickle.dump({"weight": [1.0, 2.0]}, f, protocol=4)
    with pytest.raises(UnsafeCheckpointError, match="Unsupported operand"):
        read_state_dict(tmp_path / "raw.pkl.pt")


def test_missing_corrupt_and_unknown_files(tmp_path):
    with pytest.raises(ModelSourceError, match="file not found"):
        read_state_dict(tmp_path / "absent.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not really")
    with pytest.raises(ModelSourceError, match="not a valid safetensors file"):
        read_state_dict(tmp_path / "bad.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="unsupported weight file type"):
        read_state_dict(tmp_path / "w.onnx")


def test_load_strict_names_missing_unexpected_and_misshapen_keys():
    layer = nn.Linear(2, 3)
    good = {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}
    load_strict(layer, good, "src")
    assert torch.equal(layer.weight, good["weight"])
    with pytest.raises(ModelSourceError, match=r"1 missing .*'bias'"):
        load_strict(layer, {"weight": torch.ones(3, 2)}, "src")
    with pytest.raises(ModelSourceError, match=r"1 unexpected .*'extra'"):
        load_strict(layer, {**good, "extra": torch.ones(1)}, "src")
    with pytest.raises(ModelSourceError, match="size mismatch"):
        load_strict(layer, {"weight": torch.ones(2, 2), "bias": torch.zeros(3)}, "src")


def test_strip_prefix():
    assert list(strip_prefix({"module.a": torch.zeros(1), "b": torch.zeros(1)}, "module.")) == ["a", "b"]
