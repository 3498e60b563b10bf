"""Pivoted low-rank form (PIFA, Zhao et al. 2025): a rank-r matrix in r (m + n - r) numbers instead of r (m + n).

Any rank-r matrix W_r = B A (B: m x r) has r linearly independent rows S. They
are stored as they are (core = W_r[S], r x n), and every other row as a
combination of them (coefficients = B[~S] B[S]^-1, (m - r) x r). It is the same
matrix, not a further approximation, so at one parameter budget the rank can
be much higher: at 90% of a 576 x 576 weight's numbers, rank 393 instead of 259.

The rows are picked by QR with column pivoting on an orthonormal basis of B's
columns, which keeps B[S] well conditioned (coefficients of modest size, which
also matters when they are quantized).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from krunch.decompose.svd import LowRank


@dataclass(frozen=True)
class Pivoted:
    core: torch.Tensor  # (r, in): the pivot rows of the low-rank weight
    coefficients: torch.Tensor  # (out - r, r): the other rows as combinations of the pivot rows
    pivots: torch.Tensor  # (r,) int64: which output rows the core holds
    others: torch.Tensor  # (out - r,) int64: the remaining output rows, in coefficient order

    @property
    def rank(self) -> int:
        return self.core.shape[0]

    def order(self) -> torch.Tensor:
        """Output position j reads row order[j] of [core outputs; coefficient outputs]."""
        return torch.argsort(torch.cat([self.pivots, self.others]))

    def to_dense(self) -> torch.Tensor:
        rows = torch.cat([self.core, self.coefficients @ self.core])
        return rows[self.order()]


def pivoted_params(out_features: int, in_features: int, rank: int) -> int:
    return rank * (out_features + in_features - rank)


def pivoted_break_even_rank(out_features: int, in_features: int) -> int:
    """Largest rank stored in fewer numbers than the dense matrix: every rank below full."""
    return min(out_features, in_features) - 1


def pivot_rows(left: torch.Tensor) -> torch.Tensor:
    """Indices of `rank` rows of `left` (m x r) spanning its column space, chosen greedily for volume."""
    import scipy.linalg  # tensorly's dependency; imported here so that loading a model never needs it

    basis = torch.linalg.qr(left.detach().double().cpu()).Q  # orthonormal: the pivot choice ignores column scaling
    _, permutation = scipy.linalg.qr(basis.T.numpy(), mode="r", pivoting=True)
    return torch.as_tensor(permutation[: left.shape[1]].copy(), dtype=torch.long)


def pivoted(factors: LowRank) -> Pivoted:
    """The pivoted form of left @ right: computed in float64, returned in the factors' dtype and device."""
    left, right = factors.left.detach().double(), factors.right.detach().double()
    out_features, rank = left.shape
    pivots = pivot_rows(left).to(left.device)
    mask = torch.ones(out_features, dtype=torch.bool, device=left.device)
    mask[pivots] = False
    others = torch.arange(out_features, device=left.device)[mask]
    pivot_block = left[pivots]
    # coefficients = left[others] @ pivot_block^-1, as a solve: X pivot_block = left[others]
    coefficients = torch.linalg.solve(pivot_block, left[others], left=False)
    dtype = factors.left.dtype
    return Pivoted((pivot_block @ right).to(dtype), coefficients.to(dtype), pivots, others)
