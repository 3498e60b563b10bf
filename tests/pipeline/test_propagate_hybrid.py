"""Error propagation replays each block with the arguments the model itself passes it: in a hybrid model
(Gemma-3 style: sliding-window and global attention layers with different rotary bases) block 0's mask and
rotary tables are wrong for the global layers. A model that does work between its blocks cannot be replayed
and is refused before any work. Small random-weight models from transformers' own configs: plumbing checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

import krunch
from krunch.api import as_loaded, calibration_inputs
from krunch.calibration.propagate import block_calls, check_replay, find_blocks
from krunch.errors import KrunchError
from krunch.spec import Calibration

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
RECIPE = {"rules": [{"match": "model.layers.*.mlp.*", "method": "svd", "activationAware": True, "rank": {"fixed": 8}}],
          "calibration": {"propagate": True}}  # fmt: skip


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=16, sliding_window=8, layer_types=LAYER_TYPES,
                              max_position_embeddings=256, rope_local_base_freq=10.0)  # fmt: skip
    model = Gemma3ForCausalLM(config).eval()
    inputs = [{"input_ids": torch.randint(1, 128, (2, 48))} for _ in range(2)]  # longer than the sliding window
    return model, inputs


def test_each_block_is_replayed_with_its_own_mask_and_rotary_tables(hybrid):
    model, inputs = hybrid
    loaded = as_loaded(model)
    loaded.calibration_inputs = calibration_inputs(inputs, None)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    blocks = find_blocks(model, names)
    recorded = block_calls(loaded, blocks, Calibration())
    assert len(recorded.calls) == 4 and all(len(calls) == 2 for calls in recorded.calls)
    sliding, full = recorded.calls[0][0][1], recorded.calls[1][0][1]
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])  # different rotary bases
    assert torch.equal(sliding["position_embeddings"][0], recorded.calls[2][0][1]["position_embeddings"][0])
    check_replay(blocks, recorded)  # replayed in order with their own arguments, the blocks are the model

    # What replaying block 0's arguments everywhere (the old behaviour) feeds the later blocks.
    hidden = recorded.first_hidden[0]
    with torch.inference_mode():
        for index, block in enumerate(blocks.modules[:-1]):
            out = block(hidden, **recorded.calls[0][0][1])
            hidden = out[0] if isinstance(out, tuple) else out
            real = recorded.first_hidden[index + 1]
            if index >= 1:
                assert float((hidden - real).norm() / real.norm()) > 0.01, index


def test_propagation_runs_on_a_hybrid_model(hybrid):
    model, inputs = hybrid
    result = krunch.compress(model, RECIPE, calibration=inputs, progress=False)
    assert result.execution["calibration"] == "propagated" and result.execution["blocks"] == 4
    assert len(result.layers()) == 12 and all(row["rank"] == 8 for row in result.layers())


class Scaled(nn.Module):
    """Blocks in a ModuleList, with work between them that no block does (a per-depth scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for depth, block in enumerate(self.blocks):
            x = block(x) * (0.5 + depth)
        return x


def test_a_model_with_work_between_its_blocks_is_refused_before_any_work():
    torch.manual_seed(0)
    model = Scaled()
    recipe = {"rules": [{"match": "blocks.*", "method": "svd", "activationAware": True, "rank": {"fixed": 4}}],
              "calibration": {"propagate": True}}  # fmt: skip
    with pytest.raises(KrunchError, match="block 1 inputs .* away from the model's own"):
        krunch.compress(model, recipe, calibration=[torch.randn(8, 16) for _ in range(2)], progress=False)
