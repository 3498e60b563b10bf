"""Rank selection from a spectrum, and the error a truncation leaves."""

from __future__ import annotations

import math

import torch

from krunch.spec import RankRule


def tail_fraction(singular_values: torch.Tensor) -> torch.Tensor:
    """tail[r] = squared energy left out when keeping r components, as a fraction of the total (r = 0..n)."""
    energy = singular_values.double().pow(2)
    total = energy.sum().clamp(min=1e-300)
    kept = torch.cat([energy.new_zeros(1), energy.cumsum(0)])
    return ((total - kept) / total).clamp(min=0.0)


def error_budget(rule: RankRule) -> float | None:
    """The relative Frobenius error a rule allows; None for a fixed rank."""
    if rule.max_error is not None:
        return rule.max_error
    if rule.energy is not None:
        return math.sqrt(max(0.0, 1.0 - rule.energy))
    return None


def rank_for_error(singular_values: torch.Tensor, relative_error: float) -> int:
    """Smallest rank whose truncation error is at most `relative_error` of the norm (at least 1)."""
    tail = tail_fraction(singular_values)
    within = (tail <= relative_error**2 + 1e-12).nonzero()
    return max(1, int(within[0]) if len(within) else len(singular_values))
