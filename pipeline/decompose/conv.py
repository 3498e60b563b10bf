"""Tucker-2 and CP decompositions of a Conv2d kernel (out, in, kh, kw), via tensorly.

Tucker-2 keeps the spatial modes and compresses the channel modes:
W ~ core x_0 U_out x_1 U_in, run as 1x1 (in -> r_in), kxk core (r_in -> r_out),
1x1 (r_out -> out). CP writes W as a sum of R rank-one terms, run as
1x1 (in -> R), depthwise kh x 1, depthwise 1 x kw, 1x1 (R -> out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from krunch.decompose import tensorly_pytorch
from krunch.decompose.svd import whitening_factor

TUCKER_ITERATIONS = 20
CORE_RIDGE = 1e-6  # of the reduced Gram's mean diagonal: numerical safety only, the patches far outnumber the core's inputs
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
    with tensorly_pytorch() as tl:
        (core, (out_factor, in_factor)), _ = tl.decomposition.partial_tucker(
            weight.detach().double(), rank=list(ranks), modes=[0, 1], n_iter_max=TUCKER_ITERATIONS, init="svd", random_state=seed
        )
    return Tucker2(*(t.to(weight.dtype).contiguous() for t in (core, out_factor, in_factor)))


def activation_aware_tucker2(weight: torch.Tensor, gram: torch.Tensor, ranks: tuple[int, int]) -> Tucker2:
    """Tucker-2 fitted to the conv's outputs on calibration data, not to its kernel. `gram` is the Gram of the
    input patches (in*kh*kw square, the order of weight.reshape(out, -1)).

    The input factor is the channel-mode truncation of the kernel whitened by the input-channel covariance
    (SVD-LLM's whitening, per channel); the core is then the least-squares map from the projected patches to
    the original outputs; the output factor keeps the principal directions of those fitted outputs (so the
    core is projected on them). Each step is closed-form; data-free Tucker truncates kernel energy that the
    inputs may never excite and keeps output directions nothing downstream reads."""
    r_out, r_in = ranks
    out_ch, in_ch, kh, kw = weight.shape
    taps = kh * kw
    w = weight.detach().double().reshape(out_ch, in_ch * taps)
    g = gram.double()
    channels = g.reshape(in_ch, taps, in_ch, taps).diagonal(dim1=1, dim2=3).sum(-1) / taps  # (in, in)
    lower = whitening_factor(channels)
    by_channel = w.reshape(out_ch, in_ch, taps).transpose(1, 2).reshape(out_ch * taps, in_ch)
    _, _, vh = torch.linalg.svd(by_channel @ lower, full_matrices=False)
    in_factor = torch.linalg.solve_triangular(lower.T, vh[:r_in].T, upper=True)  # L^-T V_r: (in, r_in)
    lift = torch.kron(in_factor.contiguous(), torch.eye(taps, dtype=w.dtype, device=w.device))  # projected patch -> patch
    reduced = lift.T @ g @ lift
    ridge = CORE_RIDGE * reduced.diagonal().mean().clamp(min=1e-30)
    eye = torch.eye(reduced.shape[0], dtype=w.dtype, device=w.device)
    fitted = torch.linalg.solve(reduced + ridge * eye, lift.T @ g @ w.T).T  # (out, r_in*taps)
    _, vectors = torch.linalg.eigh(fitted @ reduced @ fitted.T)  # ascending eigenvalues
    out_factor = vectors[:, -r_out:].flip(-1)
    core = (out_factor.T @ fitted).reshape(r_out, r_in, kh, kw)
    # Whitening leaves the input factor's columns at the scale of 1/sqrt(channel variance); unit columns put that
    # scale into the core, as data-free Tucker's orthonormal factors do, so healing's steps suit every factor.
    norms = in_factor.norm(dim=0).clamp(min=1e-30)
    in_factor, core = in_factor / norms, core * norms[None, :, None, None]
    return Tucker2(*(t.to(weight.dtype).contiguous() for t in (core, out_factor, in_factor)))


def cp_conv(weight: torch.Tensor, rank: int, seed: int = 0) -> CPConv:
    with tensorly_pytorch() as tl:
        cp = tl.decomposition.parafac(weight.detach().double(), rank=rank, n_iter_max=CP_ITERATIONS, init="random",
                                      random_state=seed, tol=1e-7)  # fmt: skip
    out_factor, in_factor, height, width = cp.factors
    return CPConv(*(t.to(weight.dtype).contiguous() for t in (out_factor * cp.weights, in_factor, height, width)))
