"""`tucker`: Tucker-2 of a Conv2d kernel, run as 1x1 -> kxk core -> 1x1 (two channel ranks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from krunch.methods.base import CompressionMethod, LayerKind
from krunch.methods.registry import register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from krunch.plan import LayerPlan


def refuse_grouped(name: str, module: nn.Module) -> str | None:
    """Factorising a grouped conv would mix channels its groups keep apart."""
    if getattr(module, "groups", 1) != 1:
        return f"{name} is a grouped/depthwise Conv2d; use method none (quantize only)"
    return None


@register
class Tucker(CompressionMethod):
    name = "tucker"
    description = "Tucker-2 of a Conv2d: 1x1 -> kxk core -> 1x1; rank is both channel ranks"
    kinds = (LayerKind.CONV2D,)
    activation_aware = True

    def refuse(self, name: str, module: nn.Module) -> str | None:
        return refuse_grouped(name, module)

    def rank_caps(self, plan: LayerPlan) -> list[int]:
        return list(plan.weight_shape[:2])

    def params_for_ranks(self, plan: LayerPlan, ranks: list[int]) -> int:
        from krunch.decompose.conv import tucker2_params

        return tucker2_params(plan.weight_shape, (ranks[0], ranks[1]))

    def spectra(self, plan: LayerPlan, weight: torch.Tensor, gram: torch.Tensor | None) -> list[torch.Tensor]:
        from krunch.decompose.conv import channel_spectra

        return list(channel_spectra(weight))

    def build(self, plan: LayerPlan, module: nn.Module, ranks: list[int], gram: torch.Tensor | None) -> nn.Module:
        from krunch.decompose.conv import activation_aware_tucker2, tucker2
        from krunch.runtime.conv import TuckerConv2d

        channel_ranks = (ranks[0], ranks[1])
        if plan.activation_aware:
            tucker = activation_aware_tucker2(module.weight, gram, channel_ranks)
        else:
            tucker = tucker2(module.weight, channel_ranks, seed=plan.seed)
        return TuckerConv2d.from_factors(module, tucker, plan.quantize)
