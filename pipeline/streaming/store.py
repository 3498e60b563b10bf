"""Where each tensor of a model lives among its safetensors files, read one tensor (or a run of rows) at a time.

safetensors maps the file and hands out tensors backed by the mapping, so a tensor read here costs memory only
while it is held: what a streamed forward drops is gone from the process.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from krunch.sources.hf import SAFETENSORS_FLOATS

_DTYPES = {**SAFETENSORS_FLOATS, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
           "I64": torch.int64, "BOOL": torch.bool, "F64": torch.float64}  # fmt: skip


class TensorStore:
    """The keys of a set of safetensors files, from their headers alone, and reads of single tensors."""

    def __init__(self, files: tuple[Path, ...] | list[Path]) -> None:
        self.files = tuple(files)
        self._where: dict[str, tuple[str, tuple[int, ...], torch.dtype]] = {}
        for path in self.files:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    self._where[key] = (str(path), tuple(piece.get_shape()), _DTYPES.get(piece.get_dtype(), torch.float32))

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def path_of(self, key: str) -> str:
        return self._where[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key][1]

    def nbytes(self, key: str) -> int:
        _, shape, dtype = self._where[key]
        return math.prod(shape) * torch.empty((), dtype=dtype).element_size()

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(key) for key in self._where)

    def read(self, key: str) -> torch.Tensor:
        with safe_open(self._where[key][0], framework="pt", device="cpu") as handle:
            return handle.get_tensor(key)

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a tensor, without reading the rest."""
        with safe_open(self._where[key][0], framework="pt", device="cpu") as handle:
            return handle.get_slice(key)[start:stop]


def stored_names(model: nn.Module, store: TensorStore) -> dict[str, str]:
    """For every state-dict name of `model`, the key the store holds it under: its own, or for a tensor tied to
    another (an LM head that is the embedding, stored once) the key of the name it shares that tensor with."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(name)
    found: dict[str, str] = {}
    for names in by_tensor.values():
        present = next((name for name in names if name in store), None)
        if present is not None:
            found.update(dict.fromkeys(names, present))
    return found
