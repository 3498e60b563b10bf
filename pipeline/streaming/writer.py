"""A compressed model's weights written as its layers finish: tensors are held until a shard's worth has
gathered, then written and dropped, so the driver never holds the whole state dict."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from krunch.artifact import MAX_SHARD_BYTES, WEIGHTS, WEIGHTS_INDEX, shard_name, write_index


class ShardWriter:
    """Named tensors in, shards out: each shard holds at most `shard_bytes` (a bigger tensor alone); `close`
    gives the files `save_pretrained`'s names and index, or one `model.safetensors` if one shard sufficed."""

    def __init__(self, directory: Path, shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.directory, self.shard_bytes = directory, shard_bytes
        directory.mkdir(parents=True, exist_ok=True)
        for stale in [*directory.glob("model*.safetensors"), directory / WEIGHTS_INDEX]:
            stale.unlink(missing_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self.flush()
        self.names.add(name)
        tensor = tensor.detach().contiguous()
        whole = tensor.untyped_storage().nbytes() == nbytes  # a view into a bigger storage would be saved with all of it
        self.pending[name] = tensor if whole or not tensor.numel() else tensor.clone()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes
        if self.pending_bytes >= self.shard_bytes:  # full: written now, not held until the next tensor comes
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.directory / f"part-{len(self.parts) + 1:05d}.safetensors.tmp"
        safetensors.torch.save_file(self.pending, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        self.flush()
        if len(self.parts) == 1:
            self.parts[0][0].rename(self.directory / WEIGHTS)
            return [self.directory / WEIGHTS]
        files, weight_map = [], {}
        for number, (path, names) in enumerate(self.parts, start=1):
            final = self.directory / shard_name(number, len(self.parts))
            path.rename(final)
            files.append(final)
            weight_map |= dict.fromkeys(names, final.name)
        write_index(self.directory, weight_map, self.total_bytes)
        return files
