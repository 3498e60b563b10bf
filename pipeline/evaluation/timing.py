"""Throughput after a warm-up, with the thread count that produced it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from tqdm import tqdm

Batch = TypeVar("Batch")
Output = TypeVar("Output")


def timed_batches(
    run: Callable[[Batch], Output], batches: Sequence[Batch], sizes: Sequence[int], warm_up: bool = True,
    progress: str | None = None,
) -> tuple[list[Output], dict[str, float | int]]:
    """Run every batch once, after one untimed warm-up of the first (none for a model streamed from its files,
    whose every batch costs a read of the whole model); with `progress`, a bar of that name over the batches."""
    with torch.inference_mode():
        if warm_up:
            run(batches[0])
        start = time.perf_counter()
        outputs = [run(batch) for batch in tqdm(batches, desc=progress, unit="batch", disable=progress is None)]
        elapsed = time.perf_counter() - start
    return outputs, {
        "seconds": round(elapsed, 4),
        "items_per_s": round(sum(sizes) / elapsed, 3) if elapsed > 0 else float("inf"),
        "threads": torch.get_num_threads(),
    }
