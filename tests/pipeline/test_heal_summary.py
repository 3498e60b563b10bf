"""The healing summary compares like with like: the first and last pass over the batches, not the first and
last tenth of the steps, which read different batches when a pass is longer than a tenth."""

from __future__ import annotations

import pytest

from krunch.execution.heal import HealResult
from krunch.report import _loss_means
from krunch.spec import Heal

DIFFICULTY = [1.0, 1.0, 4.0, 4.0]  # easy batches then hard ones (MiniLM's later Wikipedia articles lose twice as much)


def cycled_losses(passes: int, shrink: float) -> list[float]:
    """Every batch's loss falls by `shrink` on each pass over the batches."""
    return [difficulty * shrink**epoch for epoch in range(passes) for difficulty in DIFFICULTY]


def result(losses: list[float], batches: int, workers: int = 1) -> HealResult:
    return HealResult(losses, seconds=1.0, device="cpu", trainable=10, state={}, workers=workers, batches=batches)


def test_a_loss_that_falls_on_every_batch_is_reported_falling():
    losses = cycled_losses(passes=3, shrink=0.8)
    assert losses[-1] > losses[0]  # a tenth of the steps at each end would say it rose
    summary = result(losses, batches=len(DIFFICULTY)).summary(Heal(steps=len(losses)))
    assert summary["loss_window"] == len(DIFFICULTY) and summary["passes"] == 3.0
    assert summary["loss_first"] == pytest.approx(sum(DIFFICULTY) / 4)
    assert summary["loss_last"] == pytest.approx(sum(DIFFICULTY) / 4 * 0.64)
    assert _loss_means(summary) == ", means of the first and last pass over its 4 batches"  # what the report line says


def test_replicas_share_a_pass_and_short_runs_fall_back_to_a_tenth():
    assert result([1.0] * 10, batches=5, workers=2).pass_steps == 3  # each step reads one batch per replica
    short = result(cycled_losses(passes=1, shrink=1.0) * 5, batches=20)  # 20 steps: not two passes of 20
    assert short.loss_window() == 2
    assert result([1.0] * 30, batches=0).loss_window() == 3  # batches unknown
