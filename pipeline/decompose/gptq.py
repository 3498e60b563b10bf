"""GPTQ rounding (Frantar et al. 2023): quantize a Linear weight so that its *outputs* on the calibration
activations change least, not its values.

Round-to-nearest treats every weight alone. GPTQ rounds one input column at a
time and spreads that column's rounding error over the columns not yet
rounded, weighted by how the inputs correlate (the inverse of the Gram
matrix H = X'X, through its upper Cholesky factor). The result is stored
exactly as round-to-nearest stores it (integer codes, fp16 scales and zero
points per group), so loading and forward are unchanged; only which integers
are chosen differs.

On the range grid a group's scale is set when its first column is reached,
from its weights as compensated so far (per-channel layouts: from the whole
weight up front), as the reference implementation does, so columns go in
their natural order. A fitted grid is fixed before compensation, which lets
the columns go in activation order.
"""

from __future__ import annotations

import torch

from krunch.decompose.svd import whitening_factor
from krunch.runtime.quant import QuantFormat, QuantizedData, fitted_scales, group_scales, grouped_view, integer_codes, pack, restored
from krunch.spec import QuantizeConfig

DAMPING = 0.01  # of H's mean diagonal, as in the reference implementation
BLOCK = 128  # columns updated together; the rest get the block's errors in one product


def inverse_cholesky(gram: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping * mean(diag H) * I)^-1, float64. The damping also gives columns no
    input ever reached (zero diagonal) a pivot, so their errors are not spread anywhere."""
    return torch.linalg.cholesky(torch.cholesky_inverse(whitening_factor(gram, damping)), upper=True)


def gptq_quantize(weight: torch.Tensor, gram: torch.Tensor, config: QuantizeConfig) -> QuantizedData:
    """`weight` (out x in) quantized in `config`'s layout, its rounding errors compensated for inputs with Gram `gram`.

    On the range grid, columns go in their natural order and each group's scale is set from its weights as
    compensated so far. On a fitted grid (`config.grid`), the scales are fitted once to the original weights,
    weighted by the Gram's diagonal, and the columns go in descending order of that diagonal (activation
    order: the inputs that matter most are rounded first, while most columns remain to absorb their errors).
    """
    if weight.dim() != 2 or gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gptq needs a 2-D weight and its inputs' Gram matrix; got {tuple(weight.shape)} and {tuple(gram.shape)}")
    grouped = grouped_view(weight, config)  # (rows, groups, group), zero-padded: padding is never compensated into
    rows, groups, group = grouped.shape
    columns = weight.shape[1]
    fixed = QuantFormat.of(config).grid == "fitted"
    if fixed:
        importance = grouped_view(gram.diagonal().float().reshape(1, -1), config)
        scale, zero = fitted_scales(grouped, config, importance)
        order = torch.argsort(gram.diagonal(), descending=True, stable=True)
    else:
        scale, zero = group_scales(grouped, config)  # per-channel: final; grouped: replaced as each group is reached
        scale, zero = scale.clone(), zero.clone()
        order = torch.arange(columns)
    work = grouped.reshape(rows, -1)[:, :columns][:, order].clone()
    inverse = inverse_cholesky(gram[order][:, order]).to(work.dtype)
    ordered_codes = torch.zeros(rows, columns, dtype=work.dtype, device=work.device)
    original = order.tolist()
    for start in range(0, columns, BLOCK):
        stop = min(start + BLOCK, columns)
        block, errors = work[:, start:stop].clone(), torch.zeros(rows, stop - start, dtype=work.dtype, device=work.device)
        local = inverse[start:stop, start:stop]
        for offset in range(stop - start):
            column = original[start + offset]
            g = column // group
            if not fixed and config.group_size and column % group == 0:  # the group's range, after the errors compensated into it
                ahead = torch.cat([block[:, offset:], work[:, stop:]], dim=1)[:, : group]
                fresh_scale, fresh_zero = group_scales(torch.nn.functional.pad(ahead, (0, group - ahead.shape[1]))[:, None], config)
                scale[:, g] = fresh_scale[:, 0]
                if fresh_zero.numel():
                    zero[:, g] = fresh_zero[:, 0]
            s, z = scale[:, g], zero[:, g] if zero.numel() else zero
            values = block[:, offset]
            column_codes = integer_codes(values, s, z, config)
            ordered_codes[:, start + offset] = column_codes
            error = (values - restored(column_codes, s, z, config)) / local[offset, offset]
            block[:, offset:] -= error[:, None] * local[offset, offset:][None, :]
            errors[:, offset] = error
        work[:, stop:] -= errors @ inverse[start:stop, stop:]
    codes = torch.zeros(rows, groups * group, dtype=work.dtype, device=work.device)
    codes[:, order] = ordered_codes
    if codes.shape[1] > columns:  # padding to whole groups stores zeros, as round-to-nearest does
        last = zero[:, -1:] if zero.numel() else zero
        codes[:, columns:] = integer_codes(torch.zeros_like(codes[:, columns:]), scale[:, -1:], last, config)
    return pack(codes.reshape(rows, groups, group), scale, zero, tuple(weight.shape), config)
