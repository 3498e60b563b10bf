"""Rank options of one layer, from the spectra its method truncates: the input to the budget allocator."""

from __future__ import annotations

import torch

from krunch.plan.budget import LayerProfile, RankOption
from krunch.decompose.ranks import tail_fraction
from krunch.plan import LayerPlan, factorised_params, largest_saving_rank


def profile(plan: LayerPlan, spectra: list[torch.Tensor]) -> LayerProfile:
    """Every rank that saves space and keeps at least the rule's floor of the weight's parameters."""
    tails = [tail_fraction(s) for s in spectra]
    caps = plan.implementation.rank_caps(plan)
    least = (plan.floor or 0.0) * plan.weight_params
    options = []
    for rank in range(1, largest_saving_rank(plan) + 1):
        params = factorised_params(plan, rank)
        if params < least:
            continue
        error = sum(float(t[min(rank, cap, len(t) - 1)]) for t, cap in zip(tails, caps, strict=True))
        options.append(RankOption(rank, params, error))
    return LayerProfile(plan.name, options)  # empty when the floor is above every rank that saves space
