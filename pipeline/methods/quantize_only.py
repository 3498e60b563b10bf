"""`none`: keep the layer's weight dense, quantized by the rule's quantize config (or left as it is)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from krunch.methods.base import CompressionMethod, LayerKind
from krunch.methods.registry import register

if TYPE_CHECKING:
    import torch
    from torch import nn

    from krunch.plan import LayerPlan


@register
class QuantizeOnly(CompressionMethod):
    name = "none"
    description = "keep the weight dense; quantized when quantize is set (int8/int4, nearest or gptq rounding, range or fitted grid)"
    kinds = (LayerKind.LINEAR, LayerKind.CONV2D, LayerKind.EMBEDDING)
    factorizing = False
    spectral = False

    def params_for_ranks(self, plan: LayerPlan, ranks: list[int]) -> int:
        return plan.weight_params

    def runtime_note(self, plan: LayerPlan) -> str | None:
        if plan.quantize is None:
            return None
        if plan.kind is LayerKind.LINEAR or plan.tied_to:
            import torch

            from krunch.runtime.kernels import choose_kernel

            kernel, why = choose_kernel(plan.weight_shape, plan.quantize, torch.device("cpu"))
            return f"kernel {kernel.value} ({why})"
        if plan.kind is LayerKind.EMBEDDING:
            return "embedding rows dequantized as looked up"
        return "kernel dequantize (no quantized convolution kernel)"

    def build(self, plan: LayerPlan, module: nn.Module, ranks: list[int], gram: torch.Tensor | None) -> nn.Module:
        from krunch.runtime.quantized import QuantizedConv2d, QuantizedEmbedding, QuantizedLinear
        from krunch.spec import Rounding

        quantize = plan.quantize
        assert quantize is not None, "a layer left dense and unquantized is not rebuilt"
        if plan.kind is LayerKind.LINEAR:
            codes = None
            if quantize.rounding is Rounding.GPTQ or plan.grid_fitted_to_inputs:
                if gram is None:
                    raise ValueError(f"{'gptq rounding' if plan.gptq else 'a fitted grid'} needs the calibration Gram matrix of the layer's inputs")
            if quantize.rounding is Rounding.GPTQ:
                from krunch.decompose.gptq import gptq_quantize

                codes = gptq_quantize(module.weight, gram, quantize)
            elif plan.grid_fitted_to_inputs:
                from krunch.decompose.grid import fitted_to_inputs

                codes = fitted_to_inputs(module.weight, gram, quantize)
            return QuantizedLinear.from_dense(module, quantize, codes)
        if plan.kind is LayerKind.CONV2D:
            return QuantizedConv2d.from_dense(module, quantize)
        return QuantizedEmbedding.from_dense(module, quantize)
