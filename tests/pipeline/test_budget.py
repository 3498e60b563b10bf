"""The global budget: meets the target from below, within one rank step, and prefers cheap errors."""

from __future__ import annotations

import pytest

from krunch.plan.budget import BudgetError, LayerProfile, RankOption, allocate


def svd_like(name: str, decay: float, size: int = 64) -> LayerProfile:
    energies = [decay**k for k in range(size)]
    total = sum(energies)
    return LayerProfile(name, [RankOption(r, r * 2 * size, sum(energies[r:]) / total) for r in range(1, size // 2)])


def test_budget_is_met_within_one_step_and_spent_where_error_falls_most():
    fast, slow = svd_like("fast", 0.5), svd_like("slow", 0.95)
    budget = 40 * 128
    chosen = allocate([fast, slow], budget)
    spent = sum(option.params for option in chosen.values())
    assert budget - 128 < spent <= budget
    assert chosen["slow"].rank > chosen["fast"].rank  # a slowly decaying spectrum needs more rank


def test_allocation_beats_a_uniform_split():
    profiles = [svd_like(f"l{i}", decay) for i, decay in enumerate((0.3, 0.6, 0.9, 0.97))]
    budget = 4 * 12 * 128
    chosen = allocate(profiles, budget)
    uniform = sum(p.options[11].error for p in profiles)
    assert sum(option.error for option in chosen.values()) < uniform


def test_impossible_budget_is_refused():
    with pytest.raises(BudgetError, match="below the smallest possible total"):
        allocate([svd_like("a", 0.5)], 10)
