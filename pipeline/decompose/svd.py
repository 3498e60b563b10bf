"""Truncated SVD of a matrix, plain or activation-aware (SVD-LLM whitening).

W (out x in) ~ left @ right with left (out x r), right (r x in). With
calibration activations X, the Gram matrix G = X^T X = L L^T; truncating
W L instead of W minimises the error of the layer's *outputs* on that data,
and right = S_r V_r^T L^{-1} undoes the whitening.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RANDOMIZED_MIN_SIZE = 1024  # below this an exact SVD is as fast
RANDOMIZED_MAX_RANK_FRACTION = 0.25
OVERSAMPLES = 10
POWER_ITERATIONS = 4


@dataclass(frozen=True)
class LowRank:
    left: torch.Tensor  # (out, r)
    right: torch.Tensor  # (r, in)

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def to_dense(self) -> torch.Tensor:
        return self.left @ self.right


def low_rank_params(out_features: int, in_features: int, rank: int) -> int:
    return rank * (out_features + in_features)


def break_even_rank(out_features: int, in_features: int) -> int:
    """Largest rank whose two factors are smaller than the dense matrix."""
    return (out_features * in_features - 1) // (out_features + in_features)


def use_randomized(shape: tuple[int, int], rank: int) -> bool:
    smaller = min(shape)
    return smaller >= RANDOMIZED_MIN_SIZE and rank <= RANDOMIZED_MAX_RANK_FRACTION * smaller


def _svd(matrix: torch.Tensor, rank: int, randomized: bool | None, seed: int) -> tuple[torch.Tensor, ...]:
    if randomized is None:
        randomized = use_randomized(tuple(matrix.shape), rank)
    if randomized:
        with torch.random.fork_rng(devices=[matrix.device] if matrix.is_cuda else []):  # leave every global RNG as found
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(matrix, q=min(rank + OVERSAMPLES, min(matrix.shape)), niter=POWER_ITERATIONS)
        return u[:, :rank], s[:rank], v[:, :rank].T
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def truncated_svd(weight: torch.Tensor, rank: int, randomized: bool | None = None, seed: int = 0) -> LowRank:
    """Best rank-r approximation; the singular values are split evenly between the factors."""
    matrix = weight.detach().double()
    u, s, vh = _svd(matrix, rank, randomized, seed)
    root = s.sqrt()
    return LowRank((u * root).to(weight.dtype), (root[:, None] * vh).to(weight.dtype))


def whitening_factor(gram: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """Lower Cholesky factor of the (damped) Gram matrix; damping grows until it is positive definite."""
    gram = gram.double()
    scale = gram.diagonal().mean().clamp(min=1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for attempt in range(8):
        factor, info = torch.linalg.cholesky_ex(gram + eye * scale * damping * 10**attempt)
        if int(info) == 0:
            return factor
    raise ValueError("calibration Gram matrix is not positive definite even with damping")


def whitened_spectrum(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(weight.detach().double() @ whitening_factor(gram))


def activation_aware_svd(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> LowRank:
    whiten = whitening_factor(gram)
    u, s, vh = torch.linalg.svd(weight.detach().double() @ whiten, full_matrices=False)
    root = s[:rank].sqrt()
    # right = diag(root) V_r^T L^{-1}, computed as a triangular solve rather than an inverse.
    right = torch.linalg.solve_triangular(whiten, (root[:, None] * vh[:rank]), upper=False, left=False)
    return LowRank((u[:, :rank] * root).to(weight.dtype), right.to(weight.dtype))
