"""Quantization with low-rank error compensation: W ~ Q + L R, where Q is W quantized (2-4 bits) and L R the
best rank-r fit of what Q lost, W - Q (LQER, Zhang et al. 2024; SVDQuant and LoftQ are the same family).

With calibration inputs both halves are fitted to the layer's outputs: Q on a grid fitted to the inputs
(`decompose.grid`) and L R by whitened truncation of the error (the activation-aware SVD), so the branch
spends its rank on the error directions the inputs excite. A second round quantizes W - L R and refits
the branch to the new error (LoftQ's alternation), kept only when it lowers the output error.
"""

from __future__ import annotations

import dataclasses

import torch

from krunch.decompose.grid import fitted_to_inputs
from krunch.decompose.svd import LowRank, activation_aware_svd, truncated_svd
from krunch.runtime.quant import QuantFormat, QuantizedData, dequantize, quantize

ROUNDS = 2


def _quantized(weight: torch.Tensor, fmt: QuantFormat, gram: torch.Tensor | None) -> QuantizedData:
    if gram is not None and fmt.grid == "fitted":
        return fitted_to_inputs(weight, gram, fmt)
    return quantize(weight, fmt)


def _branch(error: torch.Tensor, rank: int, gram: torch.Tensor | None, seed: int) -> LowRank:
    return activation_aware_svd(error, gram, rank) if gram is not None else truncated_svd(error, rank, seed=seed)


def output_error(weight: torch.Tensor, approximation: torch.Tensor, gram: torch.Tensor | None) -> float:
    """Squared error of the outputs on the calibration inputs (tr E H E'), or of the weights without them."""
    error = (approximation - weight).double()
    return float(((error @ gram.double()) * error).sum()) if gram is not None else float((error**2).sum())


def compensated_quantize(weight: torch.Tensor, config: QuantFormat | object, rank: int, gram: torch.Tensor | None = None,
                         seed: int = 0) -> tuple[QuantizedData, LowRank]:  # fmt: skip
    """The codes of W's quantized part and the rank-`rank` branch; float32 weight (out x in)."""
    fmt = QuantFormat.of(config)
    weight = weight.detach().float()
    best: tuple[float, QuantizedData, LowRank] | None = None
    target = weight
    for _ in range(ROUNDS):
        codes = _quantized(target, fmt, gram)
        quantized = dequantize(codes, fmt.symmetric)
        branch = _branch(weight - quantized, rank, gram, seed)
        error = output_error(weight, quantized + branch.left.float() @ branch.right.float(), gram)
        if best is None or error < best[0]:
            best = (error, codes, branch)
        target = weight - branch.left.float() @ branch.right.float()
    assert best is not None
    return dataclasses.replace(best[1]), best[2]
