"""`tt`: a Linear weight as a tensor train / matrix-product operator (the CompactifAI form), one bond per cut."""

from __future__ import annotations

from typing import TYPE_CHECKING

from krunch.methods.base import CompressionMethod, LayerKind
from krunch.methods.registry import register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from krunch.plan import LayerPlan


@register
class TensorTrain(CompressionMethod):
    name = "tt"
    description = "tensor-train / matrix-product operator of a Linear weight; rank is the bond dimension"
    kinds = (LayerKind.LINEAR,)
    activation_aware = True

    @staticmethod
    def mode_factors(plan: LayerPlan) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """How the output and input sizes split into the cores' modes."""
        from krunch.decompose.tt import DEFAULT_CORES, factorize

        out_features, in_features = plan.weight_shape
        return factorize(out_features, DEFAULT_CORES), factorize(in_features, DEFAULT_CORES)

    def rank_caps(self, plan: LayerPlan) -> list[int]:
        from krunch.decompose.tt import max_ranks

        return max_ranks(*self.mode_factors(plan))

    def params_for_ranks(self, plan: LayerPlan, ranks: list[int]) -> int:
        from krunch.decompose.tt import mpo_params

        return mpo_params(*self.mode_factors(plan), tuple(ranks))

    def runtime_note(self, plan: LayerPlan) -> str | None:
        return "inference on the merged dense weight wherever the core chain costs more (dense speed and memory)"

    def spectra(self, plan: LayerPlan, weight: torch.Tensor, gram: torch.Tensor | None) -> list[torch.Tensor]:
        from krunch.decompose.tt import mode_whitening, unfolding_spectra

        out_f, in_f = self.mode_factors(plan)
        whitening = mode_whitening(gram, in_f) if plan.activation_aware and gram is not None else None
        return unfolding_spectra(weight, out_f, in_f, whitening)

    def build(self, plan: LayerPlan, module: nn.Module, ranks: list[int], gram: torch.Tensor | None) -> nn.Module:
        from krunch.decompose.tt import mode_whitening, tt_svd
        from krunch.runtime.linear import MPOLinear

        out_f, in_f = self.mode_factors(plan)
        whitening = mode_whitening(gram, in_f) if plan.activation_aware else None
        return MPOLinear.from_factors(module, tt_svd(module.weight, out_f, in_f, tuple(ranks), whitening), plan.quantize)
