"""Rank options of one layer, from the spectra its method truncates: the input to the budget allocator."""

from __future__ import annotations

import torch

from krunch.plan.budget import LayerProfile, RankOption
from krunch.decompose.ranks import tail_fraction
from krunch.plan import LayerPlan, factorised_params, largest_saving_rank


DEFAULT_MAX_ERROR = 0.9  # relative error: a CNN at paramRatio 0.5 had two layers cut to 0.96 and 0.998 without it


def max_error(plan: LayerPlan) -> float:
    """The ceiling on the layer's relative truncation error: its rule's maxError, or the default."""
    return DEFAULT_MAX_ERROR if plan.max_error is None else plan.max_error


def profile(plan: LayerPlan, spectra: list[torch.Tensor]) -> LayerProfile:
    """Every rank that saves space, keeps at least the rule's floor of the weight's parameters and stays under
    its error ceiling (errors are squared relative errors: the share of the spectrum's energy left out)."""
    tails = [tail_fraction(s) for s in spectra]
    caps = plan.implementation.rank_caps(plan)
    least = (plan.floor or 0.0) * plan.weight_params
    ceiling = max_error(plan) ** 2
    options = []
    for rank in range(1, largest_saving_rank(plan) + 1):
        params = factorised_params(plan, rank)
        if params < least:
            continue
        error = sum(float(t[min(rank, cap, len(t) - 1)]) for t, cap in zip(tails, caps, strict=True))
        if error > ceiling and max_error(plan) < 1:
            continue
        options.append(RankOption(rank, params, error))
    return LayerProfile(plan.name, options)  # empty when the floor or the ceiling rules out every rank that saves space
