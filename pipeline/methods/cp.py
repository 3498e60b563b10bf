"""`cp`: CP (canonical polyadic) of a Conv2d kernel, run as 1x1 -> depthwise kh x 1 -> depthwise 1 x kw -> 1x1."""

from __future__ import annotations

from typing import TYPE_CHECKING

from krunch.methods.base import CompressionMethod, LayerKind
from krunch.methods.registry import register
from krunch.methods.tucker import refuse_grouped

if TYPE_CHECKING:
    import torch
    from torch import nn

    from krunch.plan import LayerPlan


@register
class CP(CompressionMethod):
    name = "cp"
    description = "CP of a Conv2d: 1x1 -> depthwise kh x 1 -> depthwise 1 x kw -> 1x1; needs rank.fixed"
    kinds = (LayerKind.CONV2D,)
    spectral = False  # no spectrum to read a rank from or to share a budget by

    def refuse(self, name: str, module: nn.Module) -> str | None:
        return refuse_grouped(name, module)

    def ranks_for(self, plan: LayerPlan, rank: int) -> list[int]:
        return [rank]  # a CP rank may exceed every dimension

    def params_for_ranks(self, plan: LayerPlan, ranks: list[int]) -> int:
        from krunch.decompose.conv import cp_params

        return cp_params(plan.weight_shape, ranks[0])

    def build(self, plan: LayerPlan, module: nn.Module, ranks: list[int], gram: torch.Tensor | None) -> nn.Module:
        from krunch.decompose.conv import cp_conv
        from krunch.runtime.conv import CPConv2d

        return CPConv2d.from_factors(module, cp_conv(module.weight, ranks[0], seed=plan.seed), plan.quantize)
