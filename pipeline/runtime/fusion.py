"""Sibling projections that read the same input run as one int4 matmul: q/k/v of an attention, gate/up of an MLP.

A batch-1 decode step calls the int4 kernel once per matrix, and on small matrices (SmolLM2's 576x576 q_proj)
its fixed cost per call is a large share of the step: inside a compiled decode step (`greedy_decode`,
`compile_decode`, a user's `torch.compile`) one call over the siblings' stacked rows replaces three (or two).
The stored layers are untouched (each sibling keeps its own codes, manifest entry and state dict); only their
packs, a cache, become row ranges of one fused pack built at first use. The first sibling of a group runs the
fused matmul and keeps its output until the others, called with the same input tensor, have taken their
columns; a sibling called with another input (cross-attention, a streamed copy) runs its own rows only, so
outputs are always each layer's own (bit for bit: the kernel computes each output channel alone). Prefill's
many rows keep the unfused transient-weight GEMMs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .kernels import PACK_BLOCK, PACKED_MAX_ROWS, Kernel, Packed, int4_pack_is_permutation, packed_matmul

# Whether eager forwards use the fused matmul too. Off: eager, the extra Python per call cost more than the
# saved kernel calls (docs/kernels.md); a compiled step, where that Python is traced away, always fuses.
EAGER = False
# Attribute names of siblings a parent module calls with one input, first the one called first.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


class FusedGroup:
    """The siblings of one parent and their fused pack; what is pickled or copied is only the siblings."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self._bounds: list[tuple[int, int]] = []  # each sibling's output columns (the siblings may still be unpickling here)
        self._pack: Packed | None = None
        self._views: list[Packed] = []
        self._cache: tuple[torch.Tensor, torch.Tensor, int] | None = None  # input, fused output, input version

    def __getstate__(self) -> dict[str, Any]:  # a pickle of the model keeps the siblings together, packs nothing
        return {"members": self.members}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["members"])

    @property
    def bounds(self) -> list[tuple[int, int]]:
        if not self._bounds:
            ends = [sum(m.out_features for m in self.members[: i + 1]) for i in range(len(self.members))]
            self._bounds = [(end - m.out_features, end) for m, end in zip(self.members, ends, strict=True)]
        return self._bounds

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        """Copies are not fused: a sibling copied alone (a streamed unit) must not drag its siblings along, and
        `fuse_siblings` fuses a copied model again."""
        return None

    def output(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """`member`'s output without its bias, from the fused matmul; None where `member` should run alone."""
        index = next((i for i, m in enumerate(self.members) if m is member), None)
        if index is None:
            return None
        compiling = torch.compiler.is_compiling()
        if not compiling and not EAGER:
            if index == 0:
                self.fused_pack(x.device)  # built now (a prompt's prefill), so that a compiled step finds it ready
            return None
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not 0 < rows <= PACKED_MAX_ROWS:
            return None
        if index == 0:
            pack = (self._pack if self._ready(x.device) else None) if compiling else self.fused_pack(x.device)
            if pack is None:
                return None
            out = packed_matmul(x.reshape(rows, x.shape[-1]), pack).to(x.dtype)
            self._cache = (x, out, version(x))
        elif not self._holds(x):
            return None
        assert self._cache is not None
        start, end = self.bounds[index]
        piece = self._cache[1][:, start:end].contiguous().view(*x.shape[:-1], end - start)
        if index == len(self.members) - 1:
            self._cache = None  # every sibling has its columns: hold nothing between steps
        return piece

    def _holds(self, x: torch.Tensor) -> bool:
        cache = self._cache
        return cache is not None and cache[0] is x and cache[2] == version(x)

    def _ready(self, device: torch.device) -> bool:
        """The fused pack exists for `device` and every sibling still runs on its view of it (none was moved,
        reloaded or switched to the exact path since)."""
        weights = [member.weight_q for member in self.members]
        return (self._pack is not None and self._pack.device == device and not any(w.exact for w in weights)
                and all(w._packed is v for w, v in zip(weights, self._views, strict=True)))  # fmt: skip

    def fused_pack(self, device: torch.device) -> Packed | None:
        """One int4 pack of every sibling's rows, built once per device; each sibling's own pack becomes a view of
        its rows (so the codes are held once). None when a sibling cannot share it (exact, or another kernel)."""
        weights = [member.weight_q for member in self.members]
        if any(w.exact for w in weights):
            return None
        if self._ready(device):
            return self._pack
        packs = [w.packed(device) for w in weights]
        if any(p.kernel is not Kernel.INT4_CPU or p.group_size != packs[0].group_size or p.columns != packs[0].columns for p in packs):
            return None
        self._pack = Packed(Kernel.INT4_CPU, device, torch.cat([p.weight for p in packs]), torch.cat([p.scale for p in packs], dim=1),
                            group_size=packs[0].group_size, columns=packs[0].columns)  # fmt: skip
        self._views = []
        for index, (weight, own) in enumerate(zip(weights, packs, strict=True)):
            start, end = self.bounds[index]
            weight._packed = dataclasses.replace(own, weight=self._pack.weight[start:end])  # its own rows of the fused codes
            self._views.append(weight._packed)
        return self._pack


def version(x: torch.Tensor) -> int:
    """x's in-place write counter, where torch keeps one (not for inference tensors, nor while tracing)."""
    return 0 if torch.compiler.is_compiling() or x.is_inference() else x._version


def fusable(members: list[nn.Module]) -> bool:
    """Siblings whose int4 packs can be stacked: same layout and inputs, whole pack blocks of rows each."""
    from .quantized import QuantizedLinear  # (which imports this module)

    if not all(type(m) is QuantizedLinear for m in members):
        return False
    first = members[0]
    return (first.quantize_config.bits == 4 and int4_pack_is_permutation()
            and all(m.in_features == first.in_features and m.quantize_config == first.quantize_config
                    and m.out_features % PACK_BLOCK == 0 for m in members))  # fmt: skip


def fuse_siblings(model: nn.Module) -> int:
    """Give every fusable sibling set in `model` one FusedGroup; returns how many groups. Idempotent."""
    groups = 0
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, name, None) for name in names]
            if all(isinstance(m, nn.Module) for m in members) and fusable(members):
                group = FusedGroup(members)
                for member in members:
                    member.fusion = group
                groups += 1
    return groups
