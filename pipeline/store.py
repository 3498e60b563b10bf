"""Saving and loading compressed models: what a consumer with krunch needs, without the compression stack."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from krunch.api import Compressed


def save(compressed: Compressed, directory: str | Path) -> Path:
    """Write model.safetensors and manifest.json (no pickle); `load` rebuilds it."""
    from krunch.artifact import architecture_source, save_compressed
    from krunch.run import recipe_document

    directory = Path(directory)
    source = architecture_source(compressed.model, directory)
    return save_compressed(directory, compressed.model, source, recipe_document(compressed.recipe), compressed.tied)


def load(directory: str | Path, *, model: nn.Module | None = None, factory: str | None = None) -> nn.Module:
    """A compressed model saved by `save` (or `krunch compress`). `model`: an instance of the architecture,
    for models compressed from a plain module in memory (its weights are replaced by the saved ones);
    `factory`: the module:callable a `file:` source was built with (checked against the recorded one)."""
    from krunch.artifact import load_compressed

    return load_compressed(Path(directory), skeleton=model, factory=factory).module
