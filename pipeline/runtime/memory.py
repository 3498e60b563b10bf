"""Memory a many-row forward freed, handed back to the system, so a loaded model's resident memory is what it holds.

A prefill multiplies through transient bf16 weights and builds its activations and logits; glibc keeps all of
that in its heap once freed, and a process that answered one long prompt stays that much bigger. After a forward
that used transient weights, `malloc_trim` returns the free pages (a small fraction of the prefill's time,
docs/kernels.md); decode steps use none and never trim.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import torch
from torch import nn

_pending = [False]  # a transient weight was freed since the last trim


@functools.cache
def c_library() -> ctypes.CDLL | None:
    """This process's C library, where it can be found."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def note_transient() -> None:
    """A matmul ran on a transient weight (it is freed as soon as it returns)."""
    if not torch.compiler.is_compiling():
        _pending[0] = True


def trim_after_transient(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook of a model's root: trim glibc's heap once the forward that needed transient weights is over."""
    if torch.compiler.is_compiling() or not _pending[0]:
        return
    _pending[0] = False
    library = c_library()
    trim = getattr(library, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


def trim_after_forwards(model: nn.Module) -> None:
    """Install the trimming hook on `model` once (it is pickled with the model, as a reference to this function)."""
    if trim_after_transient not in model._forward_hooks.values():
        model.register_forward_hook(trim_after_transient)
