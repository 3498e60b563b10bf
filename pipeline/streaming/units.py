"""A model whose weights stay in their files: each unit (a decoder block, a norm, the embedding) is filled from the
store when it is called and dropped when it returns, so a forward holds one unit's weights at a time.

The unit's own `forward` is replaced: the call copies the unit's weightless shell (with any hooks on the modules
inside it, such as calibration's), assigns it the stored tensors, runs the class's forward on the copy and lets it
go. Module names, hooks and attributes stay those of the model, so evaluators and calibration run it unchanged. A
plain Linear or Embedding larger than the largest block (a 49152-row LM head) is read a run of rows at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from krunch.runtime.base import CompressedLayer
from krunch.streaming.store import TensorStore, stored_names


def subtree_bytes(module: nn.Module) -> int:
    """Bytes of the distinct parameters and persistent buffers under `module` (meta tensors count their size)."""
    seen: set[int] = set()
    total = 0
    for tensor in module.state_dict(keep_vars=True).values():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def block_bytes(model: nn.Module) -> int:
    """The largest item of the model's block lists (decoder layers): the most a streamed forward holds at once."""
    largest = 0
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
            largest = max([largest, *(subtree_bytes(item) for item in module)])
    return largest or subtree_bytes(model)


class StreamedForward:
    """The forward of one unit: fill a copy of its shell from the store, run it, drop it."""

    def __init__(self, unit: nn.Module, keys: dict[str, str], store: TensorStore) -> None:
        self.unit, self.keys, self.store = unit, keys, store

    def materialised(self) -> nn.Module:
        shared = {id(self): self, id(self.store): self.store}
        config = getattr(self.unit, "config", None)
        if config is not None:
            shared[id(config)] = config
        module = copy.deepcopy(self.unit, shared)
        del module.__dict__["forward"]  # the copy runs its class's forward
        state = {name: self.store.read(key).clone() for name, key in self.keys.items()}  # own, aligned copies for the kernels
        module.load_state_dict(state, strict=True, assign=True)
        return module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.materialised()
        return type(module).forward(module, *args, **kwargs)  # the unit's own __call__ already ran its hooks


class RowChunkedLinear:
    """A plain Linear's forward, reading `rows` output rows of its weight at a time."""

    def __init__(self, unit: nn.Linear, weight_key: str, bias_key: str | None, store: TensorStore, rows: int) -> None:
        self.weight_key, self.bias_key, self.store, self.rows = weight_key, bias_key, store, rows
        self.out_features = unit.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.store.read(self.bias_key) if self.bias_key else None
        parts = []
        for start in range(0, self.out_features, self.rows):
            stop = min(start + self.rows, self.out_features)
            weight = self.store.read_rows(self.weight_key, start, stop)
            parts.append(F.linear(x.to(weight.dtype), weight, None if bias is None else bias[start:stop]))
        return torch.cat(parts, dim=-1)


class RowChunkedEmbedding:
    """A plain Embedding's lookup, reading `rows` rows of its table at a time."""

    def __init__(self, unit: nn.Embedding, weight_key: str, store: TensorStore, rows: int) -> None:
        self.weight_key, self.store, self.rows = weight_key, store, rows
        self.num_embeddings, self.embedding_dim, self.dtype = unit.num_embeddings, unit.embedding_dim, unit.weight.dtype

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty((*ids.shape, self.embedding_dim), dtype=self.dtype)
        for start in range(0, self.num_embeddings, self.rows):
            stop = min(start + self.rows, self.num_embeddings)
            inside = (ids >= start) & (ids < stop)
            if inside.any():
                out[inside] = self.store.read_rows(self.weight_key, start, stop)[ids[inside] - start].to(self.dtype)
        return out


def _chunkable(unit: nn.Module) -> bool:
    if type(unit) is nn.Linear:
        return True
    return type(unit) is nn.Embedding and unit.max_norm is None


def _units(module: nn.Module, prefix: str, limit: int) -> Iterator[tuple[str, nn.Module]]:
    """The modules to stream: whole subtrees of at most `limit` bytes, else their children; a larger leaf or
compressed layer alone."""
    size = subtree_bytes(module)
    if size == 0:
        return
    children = list(module.named_children())
    has_own = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module._buffers.values())
    if size <= limit or not children or has_own or isinstance(module, CompressedLayer):  # a compressed layer is one piece
        yield prefix, module
        return
    for name, child in children:
        yield from _units(child, f"{prefix}{name}.", limit)


def stream(model: nn.Module, store: TensorStore) -> dict[str, str]:
    """Make every weight of `model` (on the meta device) come from `store` when used; returns each streamed unit's
    name and how it is read ("whole" or "rows"). Tied tensors (an LM head that is the embedding) read one key."""
    keys = stored_names(model, store)
    state_names = set(model.state_dict(keep_vars=True))
    missing = sorted(state_names - set(keys))
    if missing:
        raise KeyError(f"the weight files hold no tensor for {missing[:5]}")
    limit = block_bytes(model)
    streamed: dict[str, str] = {}
    for prefix, unit in _units(model, "", limit):
        name = prefix.removesuffix(".")
        unit_keys = {local: keys[f"{prefix}{local}"] for local in unit.state_dict(keep_vars=True)}
        if subtree_bytes(unit) > limit and _chunkable(unit):
            bytes_per_row = subtree_bytes(unit) // unit.weight.shape[0]
            rows = max(1, limit // max(1, bytes_per_row))
            if isinstance(unit, nn.Linear):
                unit.forward = RowChunkedLinear(unit, unit_keys["weight"], unit_keys.get("bias"), store, rows)
            else:
                unit.forward = RowChunkedEmbedding(unit, unit_keys["weight"], store, rows)
            streamed[name] = "rows"
        else:
            unit.forward = StreamedForward(unit, unit_keys, store)
            streamed[name] = "whole"
    return streamed
