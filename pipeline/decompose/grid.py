"""A fitted quantization grid for a dense Linear weight, fitted to its calibration inputs rather than to its values.

The grid's scales and zero points come from `runtime.quant.fitted_scales`, each
column weighted by how large its input is in use (the Gram matrix's diagonal).
That weighting is a proxy for the layer's output error; the full measure,
e H e' for a row's weight error e and the inputs' Gram H, then picks per output
row between the fitted grid and the plain range grid, so the layer's output
error on the calibration data is never higher than rounding to nearest gives.
"""

from __future__ import annotations

import dataclasses

import torch

from krunch.runtime.quant import QuantFormat, QuantizedData, dequantize, quantize


def output_errors(weight: torch.Tensor, approximation: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """Each output row's squared error on the calibration inputs: e H e' for its weight error e (e e' without
    a Gram matrix)."""
    error = (approximation.float() - weight.float()).double()
    return ((error @ gram.double() if gram is not None else error) * error).sum(-1)


def fitted_to_inputs(weight: torch.Tensor, gram: torch.Tensor, config: QuantFormat | object) -> QuantizedData:
    """`weight` (out x in) rounded to nearest on the grid fitted for inputs with Gram `gram`, row by row no worse
    than the range grid."""
    fmt = QuantFormat.of(config)
    if weight.dim() != 2 or gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"a fitted grid needs a 2-D weight and its inputs' Gram matrix; got {tuple(weight.shape)} and {tuple(gram.shape)}")
    fitted = quantize(weight, fmt, importance=gram.diagonal().float())
    plain = quantize(weight, dataclasses.replace(fmt, grid="range"))
    worse = output_errors(weight, dequantize(fitted, fmt.symmetric), gram) > output_errors(weight, dequantize(plain, fmt.symmetric), gram)
    if not worse.any():
        return fitted

    def rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a if not a.numel() else torch.where(worse.reshape(-1, *[1] * (a.dim() - 1)), b, a)

    return dataclasses.replace(fitted, values=rows(fitted.values, plain.values), scale=rows(fitted.scale, plain.scale),
                               zero_point=rows(fitted.zero_point, plain.zero_point))  # fmt: skip
