"""bench_quality's size of torch's dynamic int8 model: what a user saving it stores, tie broken included."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from krunch.sizes import weight_bytes

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_quality.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 100)
        self.head.weight = self.embed.weight  # tied, as SmolLM2's lm_head is


def test_dynamic_int8_counts_int8_weights_and_the_embedding_its_tie_no_longer_shares():
    model = TiedLM()
    assert weight_bytes(model) == (100 * 16 + 2 * 16 + 100) * 4  # the tied weight once
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    expected = 100 * 16 * 4 + 2 * 16 * 4 + (100 * 16 + 16 + 100 * 4)  # fp32 embedding, norm; int8 head, scale, fp32 bias
    assert bench_module().dynamic_int8_bytes(quantized) == expected
