"""Pure decompositions: a weight tensor in, factors out. No modules, no I/O, no Ray, no MLflow."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def tensorly_pytorch() -> Iterator[Any]:
    """tensorly on the PyTorch backend for this thread only, inside the block: a library must not change
    tensorly's global backend under its caller. Imported only when decomposing: the layers that hold the
    factors load without tensorly (a registered model's consumers have torch, not tensorly)."""
    import tensorly as tl
    import tensorly.decomposition  # noqa: F401

    with tl.backend_context("pytorch", local_threadsafe=True):
        yield tl
