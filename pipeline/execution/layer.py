"""One layer, start to finish: choose the rank, decompose, quantize, build the replacement, measure the error.

A pure function of (plan, module, calibration Gram, allocated rank): the unit
of work a Ray task runs, and what the in-process path runs in a loop.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from krunch.decompose.ranks import error_budget, rank_for_error
from krunch.plan import LayerPlan, saving_problem
from krunch.results import LayerRow
from krunch.runtime.base import CompressedLayer
from krunch.sizes import stored_params
from krunch.spec import SpecError


@dataclass
class LayerResult:
    name: str
    method: str
    rank: int | list[int] | None
    params_before: int
    params_after: int
    rel_error: float
    seconds: float
    module: nn.Module | None  # None: the source module, unchanged
    device: str = "cpu"
    threads: int = 0  # torch threads the layer ran with
    resources: dict | None = None  # what Ray assigned the attempt that succeeded (None in process)
    kernels: dict | None = None  # the module's kernels, kept when a streamed job wrote the module out and dropped it

    def row(self) -> LayerRow:
        """The report's line; `kernels`: what each factor's matmul runs on where the layer now is."""
        kernels = self.module.kernels() if isinstance(self.module, CompressedLayer) else self.kernels
        return {"name": self.name, "method": self.method, "rank": self.rank, "params_before": self.params_before,
                "params_after": self.params_after, "rel_error": self.rel_error, "seconds": round(self.seconds, 4),
                "device": self.device, "threads": self.threads, "kernels": kernels}  # fmt: skip


def choose_ranks(plan: LayerPlan, weight: torch.Tensor, gram: torch.Tensor | None, allocated: int | None) -> list[int]:
    """Concrete ranks: [r] for svd/cp, bond dimensions for tt, [r_out, r_in] for tucker."""
    method = plan.implementation
    if allocated is not None:
        chosen = method.ranks_for(plan, allocated)
    elif plan.rank is not None and plan.rank.fixed is not None:
        chosen = method.ranks_for(plan, plan.rank.fixed)
    else:
        assert plan.rank is not None
        caps = method.rank_caps(plan)
        spectra = method.spectra(plan, weight, gram)
        per_spectrum = error_budget(plan.rank) / math.sqrt(len(spectra))  # errors add in squares
        chosen = [min(rank_for_error(s, per_spectrum), cap) for s, cap in zip(spectra, caps, strict=True)]
        _check_saves(plan, chosen)
    return chosen


def _check_saves(plan: LayerPlan, ranks: list[int]) -> None:
    params = plan.implementation.params_for_ranks(plan, ranks)
    if params >= plan.params - plan.bias_params:
        assert plan.rank is not None
        rule, value = ("energy", plan.rank.energy) if plan.rank.energy is not None else ("maxError", plan.rank.max_error)
        raise SpecError(f"{plan.field}.rank.{rule}", f"{rule} {value} needs ranks {ranks}, which {saving_problem(plan, params)}")


def compress_layer(plan: LayerPlan, module: nn.Module, gram: torch.Tensor | None = None, allocated: int | None = None) -> LayerResult:
    """A bf16 or fp16 layer is decomposed and quantized as a float32 copy (one layer's worth of memory), and its
    float factors and bias are stored back in the source's dtype."""
    start = time.perf_counter()
    if plan.calibrated and gram is None:
        what = "activation-aware factors" if plan.activation_aware else "gptq rounding" if plan.gptq else "a grid fitted to its inputs"
        raise ValueError(f"{plan.name}: {what} needs calibration statistics")
    with torch.no_grad():
        if not plan.factorized and plan.quantize is None:
            replacement, ranks = module, None  # matched but left dense and unquantized
            rel_error = 0.0
        else:
            dtype = module.weight.dtype
            work = module if dtype == torch.float32 else copy.deepcopy(module).float()
            ranks = choose_ranks(plan, work.weight, gram, allocated) if plan.factorized else None
            replacement = plan.implementation.build(plan, work, ranks or [], gram)
            if dtype != torch.float32:
                replacement = replacement.store_floats_as(dtype) if isinstance(replacement, CompressedLayer) else replacement.to(dtype)
            rel_error = relative_error(replacement, work.weight)
    rank: int | list[int] | None = ranks if ranks is None or len(ranks) > 1 else ranks[0]
    return LayerResult(plan.name, plan.method, rank, plan.params, stored_params(plan.params, replacement), rel_error,
                       time.perf_counter() - start, replacement)  # fmt: skip


def relative_error(replacement: nn.Module, weight: torch.Tensor) -> float:
    """Relative Frobenius error of the weight a replacement represents (0 for a layer left dense)."""
    with torch.no_grad():
        dense = replacement.to_dense() if isinstance(replacement, CompressedLayer) else weight
        weight = weight.float()
        return float((dense.float() - weight).norm() / weight.norm().clamp(min=1e-30))
