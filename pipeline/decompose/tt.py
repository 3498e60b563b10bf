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

import torch

from krunch.decompose import tensorly_pytorch
from krunch.runtime.linear import mpo_to_dense

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


def core_sizes(out_factors: tuple[int, ...], in_factors: tuple[int, ...], ranks: tuple[int, ...]) -> list[int]:
    bonds = (1, *ranks, 1)
    return [bonds[k] * size * bonds[k + 1] for k, size in enumerate(mode_sizes(out_factors, in_factors))]


def merge_plan(out_factors: tuple[int, ...], in_factors: tuple[int, ...], ranks: tuple[int, ...]) -> list[int]:
    """Indices k of the bonds to contract away: those where cores k and k+1 merged are no bigger than both.

    A saturated bond (r_k equal to the size of everything on one side) carries no compression:
    merging across it costs no storage and removes a contraction step that, with a large
    middle core, costs many times the dense matmul.
    """
    sizes, bonds, modes, merged = core_sizes(out_factors, in_factors, ranks), [1, *ranks, 1], mode_sizes(out_factors, in_factors), []
    k = 0
    while k < len(modes) - 1:
        together = bonds[k] * modes[k] * modes[k + 1] * bonds[k + 2]
        if together <= sizes[k] + sizes[k + 1]:
            merged.append(k)
            modes[k : k + 2] = [modes[k] * modes[k + 1]]
            sizes[k : k + 2] = [together]
            del bonds[k + 1]
        else:
            k += 1
    return merged


def mpo_params(out_factors: tuple[int, ...], in_factors: tuple[int, ...], ranks: tuple[int, ...]) -> int:
    """Stored numbers after saturated bonds are merged (see `merge_plan`)."""
    out_f, in_f, bonds = merged_structure(out_factors, in_factors, ranks)
    return sum(core_sizes(out_f, in_f, bonds))


def merged_structure(out_factors: tuple[int, ...], in_factors: tuple[int, ...], ranks: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    out_f, in_f, bonds = list(out_factors), list(in_factors), list(ranks)
    for k in merge_plan(out_factors, in_factors, ranks):
        out_f[k : k + 2] = [out_f[k] * out_f[k + 1]]
        in_f[k : k + 2] = [in_f[k] * in_f[k + 1]]
        del bonds[k]
    return tuple(out_f), tuple(in_f), tuple(bonds)


def to_tt_tensor(weight: torch.Tensor, out_factors: tuple[int, ...], in_factors: tuple[int, ...]) -> torch.Tensor:
    d = len(out_factors)
    interleave = [axis for k in range(d) for axis in (k, d + k)]
    return weight.reshape(*out_factors, *in_factors).permute(*interleave).reshape(mode_sizes(out_factors, in_factors))


def unfolding_spectra(weight: torch.Tensor, out_factors: tuple[int, ...], in_factors: tuple[int, ...],
                      whitening: list[torch.Tensor] | None = None) -> list[torch.Tensor]:  # fmt: skip
    """Singular values of each bond's unfolding of the full (optionally whitened) tensor."""
    matrix = weight.detach().double() if whitening is None else whiten_inputs(weight, whitening, in_factors)
    tensor = to_tt_tensor(matrix, out_factors, in_factors)
    sizes = tensor.shape
    return [torch.linalg.svdvals(tensor.reshape(math.prod(sizes[: k + 1]), -1)) for k in range(len(sizes) - 1)]


def kronecker_gram_factors(gram: torch.Tensor, in_factors: tuple[int, ...]) -> list[torch.Tensor]:
    """Per-input-mode Gram matrices (partial traces of X^T X), so that G ~ G_1 (x) G_2 (x) ... (K-FAC style).

    A whitening that is a Kronecker product acts on each core's input mode separately, so
    the whitened problem is still a TT problem and un-whitening keeps the MPO structure.
    """
    d = len(in_factors)
    letters = "abcdefgh"[:d]
    tensor = gram.double().reshape(*in_factors, *in_factors)
    factors = []
    for k in range(d):
        columns = "".join("z" if j == k else letters[j] for j in range(d))
        factor = torch.einsum(f"{letters}{columns}->{letters[k]}z", tensor)
        factors.append(factor / factor.diagonal().mean().clamp(min=1e-30))
    return factors


def mode_whitening(gram: torch.Tensor, in_factors: tuple[int, ...]) -> list[torch.Tensor]:
    """Lower Cholesky factors of the per-mode Grams: the Kronecker whitening for activation-aware TT."""
    from krunch.decompose.svd import whitening_factor

    return [whitening_factor(factor) for factor in kronecker_gram_factors(gram, in_factors)]


def whiten_inputs(weight: torch.Tensor, transforms: list[torch.Tensor], in_factors: tuple[int, ...]) -> torch.Tensor:
    """W (L_1 (x) L_2 (x) ...): each input mode multiplied by its own matrix."""
    tensor = weight.detach().double().reshape(weight.shape[0], *in_factors)
    for k, transform in enumerate(transforms):
        tensor = torch.movedim(torch.tensordot(tensor, transform.double(), dims=([k + 1], [0])), -1, k + 1)
    return tensor.reshape(weight.shape[0], -1)


def tt_svd(weight: torch.Tensor, out_factors: tuple[int, ...], in_factors: tuple[int, ...], ranks: tuple[int, ...],
           whitening: list[torch.Tensor] | None = None) -> MPO:  # fmt: skip
    """TT-SVD (tensorly, PyTorch backend) with the given inner bond dimensions.

    With `whitening` (lower Cholesky factors L_k of the per-mode Grams), the whitened
    weight W (L_1 (x) ...) is decomposed and each core's input mode multiplied by L_k^{-1}:
    the truncation then minimises the error on the calibration activations, not on the weights.
    """
    matrix = weight.detach().double() if whitening is None else whiten_inputs(weight, whitening, in_factors)
    tensor = to_tt_tensor(matrix, out_factors, in_factors)
    with tensorly_pytorch() as tl:
        decomposition = tl.decomposition.tensor_train(tensor, rank=[1, *ranks, 1])
    cores = [
        core.reshape(core.shape[0], o, i, core.shape[-1])
        for core, o, i in zip(decomposition.factors, out_factors, in_factors, strict=True)
    ]
    if whitening is not None:
        cores = [
            torch.einsum("roks,ki->rois", core, torch.linalg.inv(factor.double()))
            for core, factor in zip(cores, whitening, strict=True)
        ]
    out_f, in_f = list(out_factors), list(in_factors)
    for k in merge_plan(tuple(out_factors), tuple(in_factors), tuple(ranks)):
        joined = torch.einsum("aoir,rpjs->aopijs", cores[k], cores[k + 1])
        a, o, p, i, j, s = joined.shape
        cores[k : k + 2] = [joined.reshape(a, o * p, i * j, s)]
        out_f[k : k + 2] = [out_f[k] * out_f[k + 1]]
        in_f[k : k + 2] = [in_f[k] * in_f[k + 1]]
    return MPO([core.to(weight.dtype).contiguous() for core in cores], tuple(out_f), tuple(in_f))
