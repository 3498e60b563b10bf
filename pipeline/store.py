"""Saving and loading compressed models: what a consumer with krunch needs, without the compression stack."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from krunch.api import Compressed


def save(compressed: Compressed, directory: str | Path, *, max_shard_bytes: int | None = None) -> Path:
    """Write model.safetensors (shards of at most `max_shard_bytes`, default 2 GB, and their index past that)
    and manifest.json (no pickle); `load` rebuilds it."""
    from krunch.artifact import MAX_SHARD_BYTES, architecture_source, save_compressed
    from krunch.run import recipe_document

    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    directory = Path(directory)
    source = architecture_source(compressed.model, directory)
    return save_compressed(directory, compressed.model, source, recipe_document(compressed.recipe), compressed.tied,
                           max_shard_bytes or MAX_SHARD_BYTES)  # fmt: skip


def load(directory: str | Path, *, model: nn.Module | None = None, factory: str | None = None) -> nn.Module:
    """A compressed model saved by `save` (or `krunch compress`). `model`: an instance of the architecture,
    for models compressed from a plain module in memory (its weights are replaced by the saved ones);
    `factory`: the module:callable a `file:` source was built with (checked against the recorded one)."""
    from krunch.artifact import load_compressed

    return load_compressed(Path(directory), skeleton=model, factory=factory).module
