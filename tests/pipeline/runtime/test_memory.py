"""A compressed model hands the memory of a many-row forward back to the system after it, and only then."""

from __future__ import annotations

import pickle

import torch

import krunch.runtime.memory as memory
from krunch.assemble import assemble
from krunch.runtime import QuantFormat
from krunch.runtime.quantized import QuantizedLinear


class CountingLibrary:
    """The real C library, with its malloc_trim calls counted."""

    def __init__(self) -> None:
        self.library, self.trims = memory.c_library(), 0

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return self.library.malloc_trim(pad)


def test_the_heap_is_trimmed_after_a_prefill_and_not_after_a_decode_step(smollm2, monkeypatch):
    mlp = pickle.loads(pickle.dumps(smollm2.module.model.layers[3].mlp))  # a real SmolLM2 MLP, int8 below
    replacements = {name: QuantizedLinear.from_dense(getattr(mlp, name), QuantFormat(8)) for name in ("gate_proj", "up_proj", "down_proj")}
    model = assemble(mlp, replacements, {})
    assemble(model, {}, {})  # installed once, however often assembled
    assert list(model._forward_hooks.values()) == [memory.trim_after_transient]
    counting = CountingLibrary()
    monkeypatch.setattr(memory, "c_library", lambda: counting)
    monkeypatch.setattr(memory, "_pending", [False])  # not what earlier tests' models left pending
    with torch.no_grad():
        model(torch.randn(1, 1, 576))  # a decode step: packed kernels, nothing transient
        assert counting.trims == 0
        model(torch.randn(1, 64, 576))  # prefill: transient weights, trimmed once after the whole forward
        assert counting.trims == 1
        model(torch.randn(1, 1, 576))
        assert counting.trims == 1
    again = pickle.loads(pickle.dumps(model))  # the hook travels with the model
    with torch.no_grad():
        again(torch.randn(1, 64, 576))
    assert counting.trims == 2
