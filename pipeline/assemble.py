"""Swap compressed layers into a model by name; tied weights end up sharing one stored tensor."""

from __future__ import annotations

from torch import nn

from krunch.runtime.base import CompressedLayer
from krunch.runtime.fusion import fuse_siblings
from krunch.runtime.memory import trim_after_forwards


def swap_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)


def share_tied_weight(layer: nn.Module, owner: nn.Module) -> None:
    """Point a tied layer at its owner's quantized weight, so it is stored (and saved) once."""
    if isinstance(layer, CompressedLayer) and isinstance(owner, CompressedLayer):
        layer.weight_q = owner.weight_q


def assemble(model: nn.Module, replacements: dict[str, nn.Module], tied: dict[str, str]) -> nn.Module:
    """Install `replacements` (name -> module) in place; `tied` maps a layer to the layer whose weight it shares;
    int4 sibling projections then share one matmul (runtime.fusion), and the memory a prefill frees goes back to
    the system after it (runtime.memory)."""
    for name, replacement in replacements.items():
        if name in tied:
            share_tied_weight(replacement, replacements[tied[name]])
        swap_module(model, name, replacement)
    fuse_siblings(model)
    trim_after_forwards(model)
    return model
