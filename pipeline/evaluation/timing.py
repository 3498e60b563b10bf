"""Throughput after a warm-up, with the thread count that produced it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

Batch = TypeVar("Batch")
Output = TypeVar("Output")


def timed_batches(
    run: Callable[[Batch], Output], batches: Sequence[Batch], sizes: Sequence[int]
) -> tuple[list[Output], dict[str, float | int]]:
    """Run every batch once, after one untimed warm-up of the first; returns outputs and timing metrics."""
    with torch.inference_mode():
        run(batches[0])
        start = time.perf_counter()
        outputs = [run(batch) for batch in batches]
        elapsed = time.perf_counter() - start
    return outputs, {
        "seconds": round(elapsed, 4),
        "items_per_s": round(sum(sizes) / elapsed, 3) if elapsed > 0 else float("inf"),
        "threads": torch.get_num_threads(),
    }
