"""Tensor-train / matrix-product operator (MPO) form of a Linear weight.

W (out x in) with out = o1*...*od and in = i1*...*id is reshaped to a tensor
with modes (o1 i1, o2 i2, ..., od id) and split by TT-SVD into cores
G_k of shape (r_{k-1}, o_k, i_k, r_k), r_0 = r_d = 1. The bond dimensions r_k
come from the spectra of the tensor's unfoldings: truncating bond k to error
e_k gives a total error of at most sqrt(sum e_k^2) (Oseledets 2011, Thm 2.2).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import tensorly as tl
import torch
from tensorly.decomposition import tensor_train

DEFAULT_CORES = 3


@dataclass(frozen=True)
class MPO:
    cores: list[torch.Tensor]  # (r_{k-1}, o_k, i_k, r_k)
    out_factors: tuple[int, ...]
    in_factors: tuple[int, ...]

    @property
    def ranks(self) -> tuple[int, ...]:
        """Inner bond dimensions r_1..r_{d-1}."""
        return tuple(core.shape[-1] for core in self.cores[:-1])

    def to_dense(self) -> torch.Tensor:
        return mpo_to_dense(self.cores, self.out_factors, self.in_factors)


def factorize(n: int, parts: int) -> tuple[int, ...]:
    """n as `parts` factors as equal as possible (ascending), e.g. 576 -> (8, 8, 9)."""
    best: tuple[int, ...] | None = None
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    for combo in itertools.combinations_with_replacement(divisors, parts - 1):
        rest = 1
        for d in combo:
            rest *= d
        if n % rest:
            continue
        candidate = tuple(sorted((*combo, n // rest)))
        if best is None or (max(candidate) - min(candidate)) < (max(best) - min(best)):
            best = candidate
    assert best is not None
    return best


def mode_sizes(out_factors: tuple[int, ...], in_factors: tuple[int, ...]) -> list[int]:
    return [o * i for o, i in zip(out_factors, in_factors, strict=True)]


def max_ranks(out_factors: tuple[int, ...], in_factors: tuple[int, ...]) -> list[int]:
    sizes = mode_sizes(out_factors, in_factors)
    return [min(math.prod(sizes[: k + 1]), math.prod(sizes[k + 1 :])) for k in range(len(sizes) - 1)]


def mpo_params(out_factors: tuple[int, ...], in_factors: tuple[int, ...], ranks: tuple[int, ...]) -> int:
    bonds = (1, *ranks, 1)
    return sum(bonds[k] * size * bonds[k + 1] for k, size in enumerate(mode_sizes(out_factors, in_factors)))


def to_tt_tensor(weight: torch.Tensor, out_factors: tuple[int, ...], in_factors: tuple[int, ...]) -> torch.Tensor:
    d = len(out_factors)
    interleave = [axis for k in range(d) for axis in (k, d + k)]
    return weight.reshape(*out_factors, *in_factors).permute(*interleave).reshape(mode_sizes(out_factors, in_factors))


def unfolding_spectra(weight: torch.Tensor, out_factors: tuple[int, ...], in_factors: tuple[int, ...]) -> list[torch.Tensor]:
    """Singular values of each bond's unfolding of the full tensor."""
    tensor = to_tt_tensor(weight.detach().double(), out_factors, in_factors)
    sizes = tensor.shape
    return [torch.linalg.svdvals(tensor.reshape(math.prod(sizes[: k + 1]), -1)) for k in range(len(sizes) - 1)]


def tt_svd(weight: torch.Tensor, out_factors: tuple[int, ...], in_factors: tuple[int, ...], ranks: tuple[int, ...]) -> MPO:
    """TT-SVD (tensorly, PyTorch backend) with the given inner bond dimensions."""
    tl.set_backend("pytorch")
    tensor = to_tt_tensor(weight.detach().double(), out_factors, in_factors)
    decomposition = tensor_train(tensor, rank=[1, *ranks, 1])
    cores = [
        core.reshape(core.shape[0], o, i, core.shape[-1]).to(weight.dtype).contiguous()
        for core, o, i in zip(decomposition.factors, out_factors, in_factors, strict=True)
    ]
    return MPO(cores, tuple(out_factors), tuple(in_factors))


def mpo_to_dense(cores: list[torch.Tensor], out_factors: tuple[int, ...], in_factors: tuple[int, ...]) -> torch.Tensor:
    """Contract the chain back to the (out x in) matrix; for checks and error measurement only."""
    result = cores[0]  # (1, o1, i1, r1)
    for core in cores[1:]:
        result = torch.einsum("aoir,rpjs->aopijs", result, core)
        a, o, p, i, j, s = result.shape
        result = result.reshape(a, o * p, i * j, s)
    # Each step merged (o, p) and (i, j) row-major, so rows index (o1 o2 ..) and columns (i1 i2 ..).
    return result.reshape(math.prod(out_factors), math.prod(in_factors))
