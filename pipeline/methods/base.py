"""The protocol every compression method implements, and the layer kinds methods apply to.

A method says which layers it takes, what its ranks cost, which spectra bound its error (for allocation),
and how it builds the runtime layer that replaces a dense one. The class attributes are what the spec
checks a rule against; they need no torch, so the operator validates jobs without the ML stack.
"""

from __future__ import annotations

import enum
import math
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import nn

    from krunch.plan import LayerPlan


class LayerKind(enum.Enum):
    LINEAR = "Linear"
    CONV2D = "Conv2d"
    EMBEDDING = "Embedding"


class CompressionMethod:
    """One way to store a layer's weight: subclass, set the class attributes, implement the hooks, and
    decorate with `krunch.methods.register`.

    Ranks are lists: one number for a matrix rank, one per bond (tensor-train) or per channel mode (Tucker).
    A rule's single rank (`rank.fixed`, or the one a budget allocates) becomes concrete ranks through
    `ranks_for`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    kinds: ClassVar[tuple[LayerKind, ...]]
    factorizing: ClassVar[bool] = True  # keeps a rank; False: the dense weight, quantized or not
    spectral: ClassVar[bool] = True  # its rank can be read from spectra (rank.energy, rank.maxError, recipe.target)
    activation_aware: ClassVar[bool] = False  # accepts rule.activationAware (fits the outputs on calibration data)
    needs_quantize: ClassVar[bool] = False  # only meaningful with a quantize config (the rule's or the recipe's)
    rule_fields: ClassVar[frozenset[str]] = frozenset()  # method-specific Rule fields it accepts, e.g. {"form"}
    options: ClassVar[Any] = None  # a pydantic model for rule.options, or None: the rule takes no options

    # -- planning: shapes only, no data ------------------------------------------------------------
    def refuse(self, name: str, module: nn.Module) -> str | None:
        """Why this method cannot take `module` although its kind fits (None: it can)."""
        return None

    def rank_caps(self, plan: LayerPlan) -> list[int]:
        """The largest meaningful value of each concrete rank."""
        return [min(plan.weight_shape)]

    def ranks_for(self, plan: LayerPlan, rank: int) -> list[int]:
        """Concrete ranks for one rule- or budget-level rank."""
        return [min(rank, cap) for cap in self.rank_caps(plan)]

    def params_for_ranks(self, plan: LayerPlan, ranks: list[int]) -> int:
        """Numbers the factors store at these concrete ranks (bias excluded)."""
        raise NotImplementedError

    def max_rank(self, plan: LayerPlan) -> int | None:
        """A hard upper bound on rank.fixed, if the maths has one."""
        return None

    def largest_saving_rank(self, plan: LayerPlan) -> int:
        """The break-even rank: the largest one that stores fewer numbers than the dense weight."""
        dense, rank = math.prod(plan.weight_shape), 0
        while self.params_for_ranks(plan, self.ranks_for(plan, rank + 1)) < dense and rank < max(plan.weight_shape):
            rank += 1
        return rank

    def factor_shapes(self, plan: LayerPlan, rank: int) -> list[tuple[int, ...]] | None:
        """Shapes of the stored factors at `rank` where they can be quantized exactly (for bytesRatio budgets);
        None: this method's factors are offered in fp32 only."""
        return None

    def index_bytes(self, plan: LayerPlan) -> int:
        """Bytes stored besides the factors (e.g. a permutation)."""
        return 0

    def describe(self, plan: LayerPlan) -> str:
        """Words for the dry run's rule line after the method's name, e.g. ', pivoted'."""
        return ""

    def runtime_note(self, plan: LayerPlan) -> str | None:
        """What the layer runs on at inference, said before any work."""
        return None

    # -- compression: data ---------------------------------------------------------------------------
    def spectra(self, plan: LayerPlan, weight: torch.Tensor, gram: torch.Tensor | None) -> list[torch.Tensor]:
        """Singular values whose tails bound the truncation error, one per concrete rank."""
        raise ValueError(f"method {self.name} has no spectrum")

    def build(self, plan: LayerPlan, module: nn.Module, ranks: list[int], gram: torch.Tensor | None) -> nn.Module:
        """The replacement layer (a `krunch.runtime.CompressedLayer`), on the source module's device."""
        raise NotImplementedError
