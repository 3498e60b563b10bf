"""`svd`: a Linear weight truncated to rank r, stored as pivot rows + coefficients (PIFA) or two thin factors."""

from __future__ import annotations

from typing import TYPE_CHECKING

from krunch.methods.base import CompressionMethod, LayerKind
from krunch.methods.registry import register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from krunch.plan import LayerPlan


@register
class SVD(CompressionMethod):
    name = "svd"
    description = "truncated SVD of a Linear weight: pivot rows + coefficients, or two thin factors (rule.form)"
    kinds = (LayerKind.LINEAR,)
    activation_aware = True
    rule_fields = frozenset({"form"})

    @staticmethod
    def pivoted(plan: LayerPlan) -> bool:
        """Stored as pivot rows + coefficients. Without a form, int4 factors keep two factors: 4-bit noise in the
        pivot rows would reach every other row through the coefficients."""
        if plan.form is not None:
            return plan.form.value == "pivoted"
        return plan.quantize is None or plan.quantize.bits > 4

    def params_for_ranks(self, plan: LayerPlan, ranks: list[int]) -> int:
        from krunch.decompose.pivot import pivoted_params
        from krunch.decompose.svd import low_rank_params

        return (pivoted_params if self.pivoted(plan) else low_rank_params)(*plan.weight_shape, ranks[0])

    def max_rank(self, plan: LayerPlan) -> int:
        return min(plan.weight_shape)

    def largest_saving_rank(self, plan: LayerPlan) -> int:
        from krunch.decompose.pivot import pivoted_break_even_rank
        from krunch.decompose.svd import break_even_rank

        return (pivoted_break_even_rank if self.pivoted(plan) else break_even_rank)(*plan.weight_shape)

    def factor_shapes(self, plan: LayerPlan, rank: int) -> list[tuple[int, ...]]:
        out_features, in_features = plan.weight_shape
        return [(rank, in_features), (out_features - rank, rank) if self.pivoted(plan) else (out_features, rank)]

    def index_bytes(self, plan: LayerPlan) -> int:
        return 4 * plan.weight_shape[0] if self.pivoted(plan) else 0  # where each output row goes, int32

    def describe(self, plan: LayerPlan) -> str:
        return ", pivoted" if self.pivoted(plan) else ", two factors"

    def runtime_note(self, plan: LayerPlan) -> str | None:
        out_f, in_f = plan.weight_shape
        faster = out_f * in_f // (out_f + in_f)
        rank = plan.rank.fixed if plan.rank is not None else None
        if rank is not None and rank >= faster:
            return f"rank {rank} saves storage but no time: fewer multiply-adds than dense only below rank {faster}"
        return f"fewer multiply-adds than dense below rank {faster}"

    def spectra(self, plan: LayerPlan, weight: torch.Tensor, gram: torch.Tensor | None) -> list[torch.Tensor]:
        import torch

        from krunch.decompose.svd import whitened_spectrum

        if plan.activation_aware and gram is not None:
            return [whitened_spectrum(weight, gram)]
        return [torch.linalg.svdvals(weight.detach().double())]

    def build(self, plan: LayerPlan, module: nn.Module, ranks: list[int], gram: torch.Tensor | None) -> nn.Module:
        from krunch.decompose.pivot import pivoted
        from krunch.decompose.svd import activation_aware_svd, truncated_svd
        from krunch.runtime.linear import LowRankLinear, PivotedLowRankLinear

        if plan.activation_aware:
            factors = activation_aware_svd(module.weight, gram, ranks[0])
        else:
            factors = truncated_svd(module.weight, ranks[0], seed=plan.seed)
        if self.pivoted(plan):
            return PivotedLowRankLinear.from_factors(module, pivoted(factors), plan.quantize)
        return LowRankLinear.from_factors(module, factors, plan.quantize)
