"""A model whose weights stay in their files: each unit (a quarter of a decoder block at most: its attention, its
MLP matrices, a norm) is filled from the store when it is called and dropped when it returns, so a forward holds
one unit's weights at a time.

The unit's own `forward` is replaced: the call copies the unit's weightless shell (with any hooks on the modules
inside it, such as calibration's), assigns it the stored tensors, runs the class's forward on the copy and lets it
go. Module names, hooks and attributes stay those of the model, so evaluators and calibration run it unchanged. A
plain or quantized Linear or Embedding larger than a unit (a 49152-row LM head) is read a run of rows at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from krunch.runtime.base import CompressedLayer, build_layer
from krunch.runtime.kernels import PACK_BLOCK as PACK_ROWS
from krunch.runtime.kernels import transient_dtype
from krunch.runtime.quantized import QuantizedEmbedding, QuantizedLinear
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


# A unit is at most this fraction of the largest block (a decoder layer splits into its attention and MLP
# matrices): with a float32 copy of a 16-bit unit, the read and the copy are then under one block's bytes.
UNIT_SPLIT = 4


def block_bytes(model: nn.Module) -> int:
    """The largest item of the model's block lists (decoder layers): the most a streamed forward holds at once."""
    largest = 0
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1:
            largest = max([largest, *(subtree_bytes(item) for item in module)])
    return largest or subtree_bytes(model)


def compute_dtype_for(model: nn.Module) -> torch.dtype | None:
    """float32 for a 16-bit model whose GEMMs this CPU runs slowly in that dtype (fp16 always; bf16 without oneDNN's
    native bf16, `runtime.kernels.transient_dtype`); None (compute as stored) otherwise. A streamed unit is
    materialised anyway, so computing in float32 costs one unit's transient copy."""
    own = _in_compressed_layer(model)
    stored = next((t.dtype for name, t in model.state_dict(keep_vars=True).items() if t.is_floating_point() and name not in own),
                  torch.float32)  # fmt: skip
    if stored is torch.float16 or (stored is torch.bfloat16 and transient_dtype() is torch.float32):
        return torch.float32
    return None


def _in_compressed_layer(unit: nn.Module) -> set[str]:
    """State-dict names of `unit` that belong to compressed layers (whose codes and scales keep their dtype)."""
    prefixes = [f"{name}." if name else "" for name, module in unit.named_modules() if isinstance(module, CompressedLayer)]
    return {name for name in unit.state_dict(keep_vars=True) if any(name.startswith(prefix) for prefix in prefixes)}


def _compute_in(module: nn.Module, dtype: torch.dtype | None) -> None:
    """A materialised unit's compressed layers computing in `dtype` (their float factors, an embedding's output)."""
    if dtype is not None:
        for layer in module.modules():
            if isinstance(layer, CompressedLayer):
                layer.store_floats_as(dtype)


class StreamedForward:
    """The forward of one unit: fill a copy of its shell from the store, run it, drop it."""

    def __init__(self, unit: nn.Module, keys: dict[str, str], store: TensorStore, compute_dtype: torch.dtype | None) -> None:
        self.unit, self.keys, self.store, self.compute_dtype = unit, keys, store, compute_dtype
        floats = {name for name, tensor in unit.state_dict(keep_vars=True).items() if tensor.is_floating_point()}
        self.converted = floats - _in_compressed_layer(unit) if compute_dtype is not None else set()

    def materialised(self) -> nn.Module:
        shared = {id(self): self, id(self.store): self.store}
        config = getattr(self.unit, "config", None)
        if config is not None:
            shared[id(config)] = config
        module = copy.deepcopy(self.unit, shared)
        del module.__dict__["forward"]  # the copy runs its class's forward
        state = {name: self.store.read(key).to(self.compute_dtype, copy=True) if name in self.converted else self.store.read(key).clone()
                 for name, key in self.keys.items()}  # own, aligned copies for the kernels  # fmt: skip
        module.load_state_dict(state, strict=True, assign=True)
        _compute_in(module, self.compute_dtype)
        return module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.materialised()
        return type(module).forward(module, *args, **kwargs)  # the unit's own __call__ already ran its hooks


class RowChunkedLinear:
    """A plain Linear's forward, reading `rows` output rows of its weight at a time."""

    def __init__(self, unit: nn.Linear, weight_key: str, bias_key: str | None, store: TensorStore, rows: int,
                 compute_dtype: torch.dtype | None) -> None:  # fmt: skip
        self.weight_key, self.bias_key, self.store, self.rows = weight_key, bias_key, store, rows
        self.out_features, self.dtype = unit.out_features, compute_dtype or unit.weight.dtype

    def logit_runs(self, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """The outputs for each run of rows in turn, with the run's first row."""
        bias = self.store.read(self.bias_key).to(self.dtype) if self.bias_key else None
        for start, stop in _spans(self.out_features, self.rows):
            weight = self.store.read_rows(self.weight_key, start, stop).to(self.dtype)
            yield start, F.linear(x.to(weight.dtype), weight, None if bias is None else bias[start:stop])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part for _, part in self.logit_runs(x)], dim=-1)


class RowChunkedEmbedding:
    """A plain Embedding's lookup, reading `rows` rows of its table at a time."""

    def __init__(self, unit: nn.Embedding, weight_key: str, store: TensorStore, rows: int, compute_dtype: torch.dtype | None) -> None:
        self.weight_key, self.store, self.rows = weight_key, store, rows
        self.num_embeddings, self.embedding_dim = unit.num_embeddings, unit.embedding_dim
        self.dtype = compute_dtype or unit.weight.dtype

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        def rows_of(start: int, stop: int, local: torch.Tensor) -> torch.Tensor:
            return self.store.read_rows(self.weight_key, start, stop)[local].to(self.dtype)

        return _look_up_in_runs(ids, _spans(self.num_embeddings, self.rows), rows_of)


def _spans(total: int, rows: int) -> Iterator[tuple[int, int]]:
    """Consecutive runs of at most `rows` of `total` rows."""
    for start in range(0, total, rows):
        yield start, min(start + rows, total)


def _look_up_in_runs(ids: torch.Tensor, spans: Iterator[tuple[int, int]],
                     rows_of: Callable[[int, int, torch.Tensor], torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """An embedding lookup over a table read a run at a time: `rows_of(start, stop, local ids)` gives the looked-up
    rows of one run; only runs holding a looked-up id are read."""
    out: torch.Tensor | None = None
    for start, stop in spans:
        inside = (ids >= start) & (ids < stop)
        if inside.any():
            rows = rows_of(start, stop, ids[inside] - start)
            if out is None:
                out = torch.empty((*ids.shape, rows.shape[-1]), dtype=rows.dtype)
            out[inside] = rows
    assert out is not None, "no ids to look up"
    return out


class RowChunkedQuantized:
    """A quantized Linear's or Embedding's forward (an int8 LM head or embedding bigger than a unit) over runs of
    `rows` output rows: each run is a layer of the same type and layout built from the stored rows, so it runs the
    same kernel as the whole layer would."""

    def __init__(self, unit: CompressedLayer, keys: dict[str, str], store: TensorStore, rows: int,
                 compute_dtype: torch.dtype | None = None) -> None:  # fmt: skip
        self.type_name, self.config, self.keys, self.store = type(unit).__name__, unit.config(), keys, store
        self.compute_dtype = compute_dtype
        self.size_field = "out_features" if isinstance(unit, QuantizedLinear) else "num_embeddings"
        self.total = self.config[self.size_field]
        self.rows = max(PACK_ROWS, rows // PACK_ROWS * PACK_ROWS)  # whole blocks of the int4 pack

    def chunk(self, start: int, stop: int) -> CompressedLayer:
        with torch.device("meta"):
            piece = build_layer(self.type_name, {**self.config, self.size_field: stop - start})
        expected = piece.state_dict(keep_vars=True)
        state = {}
        for name, key in self.keys.items():
            per_row = expected[name].dim() > 0 and expected[name].shape[0] == stop - start and self.store.shape(key)[0] == self.total
            state[name] = self.store.read_rows(key, start, stop) if per_row else self.store.read(key).clone()
        piece.load_state_dict(state, strict=True, assign=True)
        _compute_in(piece, self.compute_dtype)
        return piece.eval()

    def spans(self) -> Iterator[tuple[int, int]]:
        return _spans(self.total, self.rows)

    def logit_runs(self, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """A Linear's outputs for each run of rows in turn, with the run's first row."""
        for start, stop in self.spans():
            yield start, self.chunk(start, stop)(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.size_field == "out_features":
            return torch.cat([part for _, part in self.logit_runs(x)], dim=-1)
        return _look_up_in_runs(x, self.spans(), lambda start, stop, local: self.chunk(start, stop)(local))


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
    """Make every weight of `model` (on the meta device) come from `store` when used, in units of at most a
    quarter of its largest block; returns each streamed unit's name and how it is read ("whole" or "rows").
    Tied tensors (an LM head that is the embedding) read one key. A 16-bit model computes in float32 where this
    CPU is slow at its dtype (`compute_dtype_for`)."""
    keys = stored_names(model, store)
    state_names = set(model.state_dict(keep_vars=True))
    missing = sorted(state_names - set(keys))
    if missing:
        raise KeyError(f"the weight files hold no tensor for {missing[:5]}")
    limit = block_bytes(model) // UNIT_SPLIT
    dtype = compute_dtype_for(model)
    streamed: dict[str, str] = {}
    for prefix, unit in _units(model, "", limit):
        name = prefix.removesuffix(".")
        unit_keys = {local: keys[f"{prefix}{local}"] for local in unit.state_dict(keep_vars=True)}
        size = subtree_bytes(unit)
        quantized = isinstance(unit, QuantizedLinear | QuantizedEmbedding)
        if size > limit and (quantized or _chunkable(unit)):
            total_rows = unit.config()["out_features" if isinstance(unit, QuantizedLinear) else "num_embeddings"] if quantized else unit.weight.shape[0]
            rows = max(1, limit * total_rows // size)  # a run of rows is at most a unit's bytes
            streamed[name] = "rows"
            if quantized:
                unit.forward = RowChunkedQuantized(unit, unit_keys, store, rows, dtype)
            elif isinstance(unit, nn.Linear):
                unit.forward = RowChunkedLinear(unit, unit_keys["weight"], unit_keys.get("bias"), store, rows, dtype)
            else:
                unit.forward = RowChunkedEmbedding(unit, unit_keys["weight"], store, rows, dtype)
        else:
            unit.forward = StreamedForward(unit, unit_keys, store, dtype)
            streamed[name] = "whole"
    return streamed
