"""Tucker-2 and CP decompositions of a Conv2d kernel (out, in, kh, kw), via tensorly.

Tucker-2 keeps the spatial modes and compresses the channel modes:
W ~ core x_0 U_out x_1 U_in, run as 1x1 (in -> r_in), kxk core (r_in -> r_out),
1x1 (r_out -> out). CP writes W as a sum of R rank-one terms, run as
1x1 (in -> R), depthwise kh x 1, depthwise 1 x kw, 1x1 (R -> out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.decompose import tensorly_pytorch

TUCKER_ITERATIONS = 20
CP_ITERATIONS = 100


@dataclass(frozen=True)
class Tucker2:
    core: torch.Tensor  # (r_out, r_in, kh, kw)
    out_factor: torch.Tensor  # (out, r_out)
    in_factor: torch.Tensor  # (in, r_in)

    @property
    def ranks(self) -> tuple[int, int]:
        return self.out_factor.shape[1], self.in_factor.shape[1]

    def to_dense(self) -> torch.Tensor:
        return torch.einsum("abhw,oa,ib->oihw", self.core, self.out_factor, self.in_factor)


@dataclass(frozen=True)
class CPConv:
    out_factor: torch.Tensor  # (out, R), carries the CP weights
    in_factor: torch.Tensor  # (in, R)
    height_factor: torch.Tensor  # (kh, R)
    width_factor: torch.Tensor  # (kw, R)

    @property
    def rank(self) -> int:
        return self.out_factor.shape[1]

    def to_dense(self) -> torch.Tensor:
        return torch.einsum("or,ir,hr,wr->oihw", self.out_factor, self.in_factor, self.height_factor, self.width_factor)


def tucker2_params(shape: tuple[int, ...], ranks: tuple[int, int]) -> int:
    out_ch, in_ch, kh, kw = shape
    r_out, r_in = ranks
    return in_ch * r_in + r_out * r_in * kh * kw + out_ch * r_out


def cp_params(shape: tuple[int, ...], rank: int) -> int:
    out_ch, in_ch, kh, kw = shape
    return rank * (out_ch + in_ch + kh + kw)


def channel_spectra(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of the output- and input-channel unfoldings (HOSVD: truncation errors add in squares)."""
    w = weight.detach().double()
    return torch.linalg.svdvals(w.reshape(w.shape[0], -1)), torch.linalg.svdvals(w.transpose(0, 1).reshape(w.shape[1], -1))


def tucker2(weight: torch.Tensor, ranks: tuple[int, int], seed: int = 0) -> Tucker2:
    tl = tensorly_pytorch()
    (core, (out_factor, in_factor)), _ = tl.decomposition.partial_tucker(
        weight.detach().double(), rank=list(ranks), modes=[0, 1], n_iter_max=TUCKER_ITERATIONS, init="svd", random_state=seed
    )
    return Tucker2(*(t.to(weight.dtype).contiguous() for t in (core, out_factor, in_factor)))


def cp_conv(weight: torch.Tensor, rank: int, seed: int = 0) -> CPConv:
    tl = tensorly_pytorch()
    cp = tl.decomposition.parafac(weight.detach().double(), rank=rank, n_iter_max=CP_ITERATIONS, init="random", random_state=seed, tol=1e-7)
    out_factor, in_factor, height, width = cp.factors
    return CPConv(*(t.to(weight.dtype).contiguous() for t in (out_factor * cp.weights, in_factor, height, width)))
