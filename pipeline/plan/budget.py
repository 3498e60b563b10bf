"""Share a global parameter budget across layers so the total normalised truncation error is smallest.

Each layer offers options (rank, parameters, error) read from its spectrum;
a Lagrangian sweep finds the trade-off rate that just fits the budget, then a
greedy pass spends what is left on the upgrades with the best error drop per
parameter. Pure: profiles in, chosen ranks out.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass(frozen=True)
class RankOption:
    rank: int
    params: int
    error: float  # squared relative error (fraction of the layer's energy left out)


@dataclass(frozen=True)
class LayerProfile:
    name: str
    options: list[RankOption]  # increasing params, non-increasing error


class BudgetError(ValueError):
    pass


def _best_for_rate(profile: LayerProfile, rate: float) -> int:
    costs = [option.error + rate * option.params for option in profile.options]
    return min(range(len(costs)), key=costs.__getitem__)


def allocate(profiles: list[LayerProfile], budget: int) -> dict[str, RankOption]:
    """Choose one option per layer with total params <= budget, minimising the summed error."""
    if not profiles:
        return {}
    smallest = sum(p.options[0].params for p in profiles)
    if smallest > budget:
        raise BudgetError(f"the budget of {budget:,} parameters is below the smallest possible total {smallest:,} (every layer at its smallest rank)")
    low, high = 0.0, 1.0
    while sum(p.options[_best_for_rate(p, high)].params for p in profiles) > budget:
        high *= 4
    for _ in range(60):  # bisection on the price of a parameter
        middle = (low + high) / 2
        if sum(p.options[_best_for_rate(p, middle)].params for p in profiles) > budget:
            low = middle
        else:
            high = middle
    chosen = [_best_for_rate(p, high) for p in profiles]
    return _fill(profiles, chosen, budget)


def _fill(profiles: list[LayerProfile], chosen: list[int], budget: int) -> dict[str, RankOption]:
    spent = sum(p.options[i].params for p, i in zip(profiles, chosen, strict=True))
    heap: list[tuple[float, int]] = []

    def push(layer: int) -> None:
        options, current = profiles[layer].options, chosen[layer]
        if current + 1 < len(options):
            extra = options[current + 1].params - options[current].params
            gain = options[current].error - options[current + 1].error
            heapq.heappush(heap, (-gain / max(extra, 1), layer))

    for layer in range(len(profiles)):
        push(layer)
    while heap:
        _, layer = heapq.heappop(heap)
        options, current = profiles[layer].options, chosen[layer]
        extra = options[current + 1].params - options[current].params
        if spent + extra <= budget:
            chosen[layer] += 1
            spent += extra
            push(layer)
    return {p.name: p.options[i] for p, i in zip(profiles, chosen, strict=True)}
