"""GPTQ rounding (Frantar et al. 2023): quantize a Linear weight so that its *outputs* on the calibration
activations change least, not its values.

Round-to-nearest treats every weight alone. GPTQ rounds one input column at a
time and spreads that column's rounding error over the columns not yet
rounded, weighted by how the inputs correlate (the inverse of the Gram
matrix H = X'X, through its upper Cholesky factor). The result is stored
exactly as round-to-nearest stores it (integer codes, fp16 scales and zero
points per group), so loading and forward are unchanged; only which integers
are chosen differs.

A group's scale is set when its first column is reached, from its weights as
compensated so far (per-channel layouts: from the whole weight up front), as
the reference implementation does. Columns go in their natural order:
descending-activation order would need the scales fixed before compensation
for grouped layouts.
"""

from __future__ import annotations

import torch

from krunch.decompose.svd import whitening_factor
from krunch.runtime.quant import QuantizedData, group_scales, grouped_view, integer_codes, pack, restored
from krunch.spec import QuantizeConfig

DAMPING = 0.01  # of H's mean diagonal, as in the reference implementation
BLOCK = 128  # columns updated together; the rest get the block's errors in one product


def inverse_cholesky(gram: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping * mean(diag H) * I)^-1, float64. The damping also gives columns no
    input ever reached (zero diagonal) a pivot, so their errors are not spread anywhere."""
    return torch.linalg.cholesky(torch.cholesky_inverse(whitening_factor(gram, damping)), upper=True)


def gptq_quantize(weight: torch.Tensor, gram: torch.Tensor, config: QuantizeConfig) -> QuantizedData:
    """`weight` (out x in) quantized in `config`'s layout, its rounding errors compensated for inputs with Gram `gram`."""
    if weight.dim() != 2 or gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"gptq needs a 2-D weight and its inputs' Gram matrix; got {tuple(weight.shape)} and {tuple(gram.shape)}")
    grouped = grouped_view(weight, config)  # (rows, groups, group), zero-padded: padding is never compensated into
    rows, groups, group = grouped.shape
    columns = weight.shape[1]
    work = grouped.reshape(rows, -1)[:, :columns].clone()
    inverse = inverse_cholesky(gram).to(work.dtype)
    codes = torch.zeros(rows, groups * group, dtype=work.dtype, device=work.device)
    scale, zero = group_scales(grouped, config)  # per-channel: final; grouped: replaced as each group is reached
    scale, zero = scale.clone(), zero.clone()
    for start in range(0, columns, BLOCK):
        stop = min(start + BLOCK, columns)
        block, errors = work[:, start:stop].clone(), torch.zeros(rows, stop - start, dtype=work.dtype, device=work.device)
        local = inverse[start:stop, start:stop]
        for offset in range(stop - start):
            column = start + offset
            g = column // group
            if config.group_size and column % group == 0:  # the group's range, after the errors compensated into it
                ahead = torch.cat([block[:, offset:], work[:, stop:]], dim=1)[:, : group]
                fresh_scale, fresh_zero = group_scales(torch.nn.functional.pad(ahead, (0, group - ahead.shape[1]))[:, None], config)
                scale[:, g] = fresh_scale[:, 0]
                if fresh_zero.numel():
                    zero[:, g] = fresh_zero[:, 0]
            s, z = scale[:, g], zero[:, g] if zero.numel() else zero
            values = block[:, offset]
            column_codes = integer_codes(values, s, z, config)
            codes[:, column] = column_codes
            error = (values - restored(column_codes, s, z, config)) / local[offset, offset]
            block[:, offset:] -= error[:, None] * local[offset, offset:][None, :]
            errors[:, offset] = error
        work[:, stop:] -= errors @ inverse[start:stop, stop:]
    if codes.shape[1] > columns:  # padding to whole groups stores zeros, as round-to-nearest does
        last = zero[:, -1:] if zero.numel() else zero
        codes[:, columns:] = integer_codes(torch.zeros_like(codes[:, columns:]), scale[:, -1:], last, config)
    return pack(codes.reshape(rows, groups, group), scale, zero, tuple(weight.shape), config)
