"""`lqer`: the dense weight quantized (int4 down to int2) plus an int8 low-rank branch that compensates its error."""

from __future__ import annotations

from typing import TYPE_CHECKING

from krunch.methods.base import CompressionMethod, LayerKind
from krunch.methods.registry import register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from krunch.plan import LayerPlan


@register
class LowRankCompensated(CompressionMethod):
    name = "lqer"
    description = "quantized weight (quantize, down to 2 bits) plus an int8 rank-r branch fitted to its error (rank.fixed)"
    kinds = (LayerKind.LINEAR,)
    spectral = False  # the rank is the branch's: a fixed choice, not read from the weight's spectrum
    activation_aware = True
    needs_quantize = True

    def params_for_ranks(self, plan: LayerPlan, ranks: list[int]) -> int:
        out_features, in_features = plan.weight_shape
        return out_features * in_features + ranks[0] * (out_features + in_features)

    def max_rank(self, plan: LayerPlan) -> int:
        return min(plan.weight_shape)

    def largest_saving_rank(self, plan: LayerPlan) -> int:
        return min(plan.weight_shape)  # it saves through the quantized weight, never through its rank

    def describe(self, plan: LayerPlan) -> str:
        return ", low-rank compensated"

    def runtime_note(self, plan: LayerPlan) -> str | None:
        import torch

        from krunch.runtime.kernels import choose_kernel

        assert plan.quantize is not None
        kernel, why = choose_kernel(plan.weight_shape, plan.quantize, torch.device("cpu"))
        return f"kernel {kernel.value} ({why}), branch int8pack"

    def build(self, plan: LayerPlan, module: nn.Module, ranks: list[int], gram: torch.Tensor | None) -> nn.Module:
        from krunch.decompose.compensate import compensated_quantize
        from krunch.runtime.linear import CompensatedLinear

        assert plan.quantize is not None, "the spec refuses lqer without quantize"
        aware = gram if plan.activation_aware else None
        codes, branch = compensated_quantize(module.weight, plan.quantize, ranks[0], aware, seed=plan.seed)
        return CompensatedLinear.from_parts(module, plan.quantize, codes, branch)
