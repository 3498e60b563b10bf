"""Factorised replacements for nn.Linear: low-rank (two thin matmuls, or pivot rows plus coefficients), MPO, and a
quantized weight with a low-rank compensation branch."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import CompressedLayer, QuantizedTensor, quantize_config_json
from .quant import QuantFormat

if TYPE_CHECKING:  # the factors' types are built at compression time; the runtime only reads their fields
    from krunch.decompose.pivot import Pivoted
    from krunch.decompose.svd import LowRank
    from krunch.decompose.tt import MPO


class _RankLinear(CompressedLayer):
    """What both low-rank forms are built from: the shape, the rank and an optional bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, quantize_config: dict | None = None) -> None:
        super().__init__(quantize_config)
        self.in_features, self.out_features, self.rank, self.has_bias = in_features, out_features, rank, bias
        self.add_factors()
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def add_factors(self) -> None:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.has_bias, "quantize_config": quantize_config_json(self.quantize_config)}  # fmt: skip


class LowRankLinear(_RankLinear):
    """y = left (right x) + b: W (out x in) as (out x r)(r x in)."""

    method = "svd"

    def add_factors(self) -> None:
        self.add_factor("right", (self.rank, self.in_features))
        self.add_factor("left", (self.out_features, self.rank))

    @classmethod
    def from_factors(cls, source: nn.Linear, factors: LowRank, quantize: QuantFormat | None = None) -> LowRankLinear:
        layer = cls(source.in_features, source.out_features, factors.rank, source.bias is not None, quantize_config_json(quantize))
        layer.set_factor("right", factors.right)
        layer.set_factor("left", factors.left)
        return layer.finish_from(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.linear(x, "right"), "left", self.bias)

    def to_dense(self) -> torch.Tensor:
        return self.factor("left") @ self.factor("right")


class PivotedLowRankLinear(_RankLinear):
    """y[pivots] = core x, y[others] = coefficients (core x), + b: a rank-r W in r (out + in - r) numbers.

    The output rows are put back in place by one gather (`order`, int32, not a parameter).
    """

    method = "svd"

    def add_factors(self) -> None:
        self.add_factor("core", (self.rank, self.in_features))
        self.add_factor("coefficients", (self.out_features - self.rank, self.rank))
        self.register_buffer("order", torch.arange(self.out_features, dtype=torch.int32))

    @classmethod
    def from_factors(cls, source: nn.Linear, factors: Pivoted, quantize: QuantFormat | None = None) -> PivotedLowRankLinear:
        layer = cls(source.in_features, source.out_features, factors.rank, source.bias is not None, quantize_config_json(quantize))
        layer.set_factor("core", factors.core)
        layer.set_factor("coefficients", factors.coefficients)
        layer.order.copy_(factors.order())
        return layer.finish_from(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self.linear(x, "core")
        rows = torch.cat([kept, self.linear(kept, "coefficients")], dim=-1)
        # gathering along the last dim of a 2-D view is several times faster on CPU than of the N-D tensor
        out = rows.reshape(-1, self.out_features).index_select(1, self.order).reshape(rows.shape)
        return out + self.bias if self.bias is not None else out

    def to_dense(self) -> torch.Tensor:
        core = self.factor("core")
        return torch.cat([core, self.factor("coefficients") @ core]).index_select(0, self.order)


class MPOLinear(CompressedLayer):
    """Matrix-product operator: cores (r_{k-1}, o_k, i_k, r_k) contracted one at a time with the input."""

    method = "tt"

    def __init__(self, out_factors: list[int], in_factors: list[int], ranks: list[int], bias: bool,
                 quantize_config: dict | None = None) -> None:  # fmt: skip
        super().__init__(quantize_config)
        self.out_factors, self.in_factors, self.ranks = tuple(out_factors), tuple(in_factors), tuple(ranks)
        self.in_features, self.out_features = math.prod(in_factors), math.prod(out_factors)
        self.has_bias = bias
        bonds = (1, *ranks, 1)
        for k, (o, i) in enumerate(zip(out_factors, in_factors, strict=True)):
            self.add_factor(f"core{k}", (bonds[k], o, i, bonds[k + 1]))
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        self._merged: tuple[tuple, torch.Tensor] | None = None  # (cores' key, dense weight) for inference (`kernel`)

    @classmethod
    def from_factors(cls, source: nn.Linear, mpo: MPO, quantize: QuantFormat | None = None) -> MPOLinear:
        layer = cls(list(mpo.out_factors), list(mpo.in_factors), list(mpo.ranks), source.bias is not None, quantize_config_json(quantize))
        for k, core in enumerate(mpo.cores):
            layer.set_factor(f"core{k}", core)
        return layer.finish_from(source)

    def cores(self, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        return [self.factor(f"core{k}", dtype) for k in range(len(self.out_factors))]

    def contraction_flops(self) -> int:
        """Multiply-adds per input row of the core-by-core contraction (left to right)."""
        flops, produced, remaining, bonds = 0, 1, self.in_features, (1, *self.ranks, 1)
        for k, (o, i) in enumerate(zip(self.out_factors, self.in_factors, strict=True)):
            remaining //= i
            flops += produced * remaining * bonds[k] * i * o * bonds[k + 1]
            produced *= o
        return flops

    def merge_flops(self) -> int:
        """Multiply-adds of contracting the cores into the dense weight (`mpo_to_dense`)."""
        flops, rows, columns = 0, self.out_factors[0], self.in_factors[0]
        bonds = (1, *self.ranks, 1)
        for k in range(1, len(self.out_factors)):
            flops += rows * columns * bonds[k] * self.out_factors[k] * self.in_factors[k] * bonds[k + 1]
            rows, columns = rows * self.out_factors[k], columns * self.in_factors[k]
        return flops

    def kernel(self, rows: int = 1, training: bool = False) -> str:
        """How a forward of `rows` rows runs: `contract` core by core, `merged` on the dense weight contracted
        once and kept (inference), or `merge` it anew each forward (training: gradients reach the cores) —
        whichever takes fewer multiply-adds. At the bonds a parameter budget picks, the chain usually costs
        more than the dense matmul it replaces, so inference runs at dense speed and holds a dense weight."""
        dense = self.out_features * self.in_features
        if rows * self.contraction_flops() <= rows * dense + (0 if not training else self.merge_flops()):
            return "contract"
        return "merge" if training else "merged"

    def kernels(self) -> dict[str, str]:
        return {**super().kernels(), "chain": self.kernel()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        kernel = self.kernel(rows, training)
        if kernel == "merged":
            return F.linear(x, self.merged_weight().to(x.dtype), self.bias)
        if kernel == "merge":
            return F.linear(x, self.to_dense().to(x.dtype), self.bias)
        leading = x.shape[:-1]
        # state: (batch, outputs so far, bond, remaining inputs)
        state = x.reshape(-1, 1, 1, self.in_features)
        for core, i in zip(self.cores(x.dtype), self.in_factors, strict=True):
            batch, produced, bond, remaining = state.shape
            state = state.reshape(batch, produced, bond, i, remaining // i)
            state = torch.einsum("bpriq,rois->bposq", state, core)
            state = state.reshape(batch, produced * core.shape[1], core.shape[3], remaining // i)
        out = state.reshape(*leading, self.out_features)
        return out + self.bias if self.bias is not None else out

    def merged_weight(self) -> torch.Tensor:
        """The dense weight, contracted once and kept until a core changes (in place, moved or reloaded:
        the key is each stored tensor's address and version counter)."""
        key = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))
        if self._merged is None or self._merged[0] != key:
            self._merged = (key, self.to_dense().detach())
        return self._merged[1]

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_merged": None}

    def config(self) -> dict[str, Any]:
        return {"out_factors": list(self.out_factors), "in_factors": list(self.in_factors), "ranks": list(self.ranks),
                "bias": self.has_bias, "quantize_config": quantize_config_json(self.quantize_config)}  # fmt: skip

    def to_dense(self) -> torch.Tensor:
        return mpo_to_dense(self.cores(), self.out_factors, self.in_factors)


def mpo_to_dense(cores: list[torch.Tensor], out_factors: tuple[int, ...], in_factors: tuple[int, ...]) -> torch.Tensor:
    """Contract the chain back to the (out x in) matrix; for checks and error measurement only."""
    result = cores[0]  # (1, o1, i1, r1)
    for core in cores[1:]:
        result = torch.einsum("aoir,rpjs->aopijs", result, core)
        a, o, p, i, j, s = result.shape
        result = result.reshape(a, o * p, i * j, s)
    # Each step merged (o, p) and (i, j) row-major, so rows index (o1 o2 ..) and columns (i1 i2 ..).
    return result.reshape(math.prod(out_factors), math.prod(in_factors))


BRANCH_FORMAT = QuantFormat(8)  # the compensation branch's factors: int8 per output channel


class CompensatedLinear(CompressedLayer):
    """y = Q x + left (right x) + b: a quantized weight (down to 2 bits) plus a low-rank branch, itself int8,
    that holds what the quantization lost (LQER, Zhang et al. 2024): the branch costs r (in + out) int8
    numbers and recovers the largest directions of the quantization error."""

    method = "lqer"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, quantize_config: dict) -> None:
        super().__init__(quantize_config)
        self.in_features, self.out_features, self.rank, self.has_bias = in_features, out_features, rank, bias
        self.add_factor("weight_q", (out_features, in_features))
        for name, shape in (("right", (rank, in_features)), ("left", (out_features, rank))):
            self.factor_names.append(name)
            self.add_module(name, QuantizedTensor(shape, BRANCH_FORMAT))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_parts(cls, source: nn.Linear, quantize: QuantFormat, codes: Any, branch: LowRank) -> CompensatedLinear:
        """`codes` (QuantizedData) of the quantized weight and the low-rank `branch` of what they lost."""
        layer = cls(source.in_features, source.out_features, branch.rank, source.bias is not None, quantize_config_json(quantize))
        layer.set_factor("weight_q", codes)
        layer.set_factor("right", branch.right)
        layer.set_factor("left", branch.left)
        return layer.finish_from(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, "weight_q", self.bias) + self.linear(self.linear(x, "right"), "left")

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.has_bias, "quantize_config": quantize_config_json(self.quantize_config)}  # fmt: skip

    def to_dense(self) -> torch.Tensor:
        return self.factor("weight_q") + self.factor("left") @ self.factor("right")
