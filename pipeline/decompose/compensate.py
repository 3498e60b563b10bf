"""Quantization with low-rank error compensation: W ~ Q + L R, where Q is W quantized (2-4 bits) and L R the
best rank-r fit of what Q lost, W - Q (LQER, Zhang et al. 2024; SVDQuant and LoftQ are the same family).

With calibration inputs both halves are fitted to the layer's outputs: Q on a grid fitted to the inputs
(`decompose.grid`) and L R by whitened truncation of the error (the activation-aware SVD), so the branch
spends its rank on the error directions the inputs excite. A second round quantizes W - L R and refits
the branch to the new error (LoftQ's alternation), kept only when it lowers the output error.
"""

from __future__ import annotations

import torch

from krunch.decompose.grid import fitted_to_inputs, output_errors
from krunch.decompose.svd import LowRank, activation_aware_svd, truncated_svd
from krunch.runtime.quant import QuantFormat, QuantizedData, dequantize, quantize

ROUNDS = 2


def _quantized(weight: torch.Tensor, fmt: QuantFormat, gram: torch.Tensor | None) -> QuantizedData:
    if gram is not None and fmt.grid == "fitted":
        return fitted_to_inputs(weight, gram, fmt)
    return quantize(weight, fmt)


def _branch(error: torch.Tensor, rank: int, gram: torch.Tensor | None, seed: int) -> LowRank:
    return activation_aware_svd(error, gram, rank) if gram is not None else truncated_svd(error, rank, seed=seed)


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
        low_rank = branch.left.float() @ branch.right.float()
        error = float(output_errors(weight, quantized + low_rank, gram).sum())
        if best is None or error < best[0]:
            best = (error, codes, branch)
        target = weight - low_rank
    assert best is not None
    return best[1], best[2]
