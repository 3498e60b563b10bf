"""Sibling int4 projections fused into one matmul, on a real SmolLM2 decoder block: the same outputs as the
unfused layers, the codes held once, and nothing of the fusion stored, pickled or kept across a move. A compiled
block calls the int4 kernel four times instead of seven; eager forwards fuse only with `fusion.EAGER` (off by
default), which the logic tests switch on so that they run without compiling."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import krunch.runtime.fusion as fusion
from krunch.runtime import QuantFormat, set_exact
from krunch.runtime.fusion import fuse_siblings
from krunch.runtime.kernels import int4_pack_is_permutation
from krunch.runtime.quantized import QuantizedLinear
from tests.pipeline.runtime.graphs import captured_calls

INT4 = QuantFormat(4, 64, symmetric=False)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.o_proj")

pytestmark = pytest.mark.skipif(not int4_pack_is_permutation(), reason="this CPU's int4 pack is not a nibble permutation: nothing fuses")


@pytest.fixture
def eager_fusion(monkeypatch):
    monkeypatch.setattr(fusion, "EAGER", True)


def int4_block(smollm2) -> torch.nn.Module:
    """SmolLM2's decoder layer 3 with its seven projections int4 (not yet fused)."""
    block = copy.deepcopy(smollm2.module.model.layers[3])
    for name in PROJECTIONS:
        parent, _, child = name.rpartition(".")
        setattr(block.get_submodule(parent), child, QuantizedLinear.from_dense(block.get_submodule(name), INT4))
    return block


def run(block: torch.nn.Module, smollm2, x: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(x.shape[1])[None]
    embeddings = smollm2.module.model.rotary_emb(x, positions)
    with torch.no_grad():
        out = block(x, position_embeddings=embeddings, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("tokens", [1, 4])
def test_fused_siblings_give_the_unfused_outputs_and_hold_the_codes_once(smollm2, tokens, eager_fusion):
    plain, fused = int4_block(smollm2), int4_block(smollm2)
    stored = {key: value.clone() for key, value in fused.state_dict().items()}
    assert fuse_siblings(fused) == 2 and fuse_siblings(plain.mlp.down_proj) == 0  # q/k/v and gate/up; o/down alone
    x = torch.randn(1, tokens, 576)
    assert torch.equal(run(fused, smollm2, x), run(plain, smollm2, x))

    group = fused.self_attn.q_proj.fusion
    assert group is fused.self_attn.v_proj.fusion and fused.self_attn.o_proj.fusion is None
    storage = group._pack.weight.untyped_storage().data_ptr()
    for member in group.members:  # each sibling's pack is its rows of the fused one: the codes once
        assert member.weight_q._packed.weight.untyped_storage().data_ptr() == storage
        assert member.weight_q.values.numel() == 0
    assert group._cache is None  # every sibling took its columns: nothing held between steps
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in stored.items())  # what is saved is unchanged

    again = pickle.loads(pickle.dumps(fused))  # the pickle has no pack; the copy fuses again on first use
    assert again.self_attn.q_proj.fusion._pack is None
    assert torch.equal(run(again, smollm2, x), run(plain, smollm2, x))
    assert again.mlp.up_proj.fusion._pack is not None

    copied = copy.deepcopy(fused)  # a deep copy (a streamed unit's shell) runs unfused until fused again
    assert copied.mlp.gate_proj.fusion is None and copy.deepcopy(fused.mlp.gate_proj).fusion is None
    assert torch.equal(run(copied, smollm2, x), run(plain, smollm2, x))
    assert fuse_siblings(copied) == 2 and torch.equal(run(copied, smollm2, x), run(plain, smollm2, x))


def test_a_sibling_called_with_another_input_runs_its_own_rows(smollm2, eager_fusion):
    """A parent that calls the siblings with different inputs (cross-attention) still gets each layer's output."""
    plain, fused = int4_block(smollm2), int4_block(smollm2)
    fuse_siblings(fused)
    x, y = torch.randn(1, 576), torch.randn(1, 576)
    attention, reference = fused.self_attn, plain.self_attn
    with torch.no_grad():
        assert torch.equal(attention.q_proj(x), reference.q_proj(x))
        assert torch.equal(attention.k_proj(y), reference.k_proj(y))  # not q's input: its own rows
        assert torch.equal(attention.v_proj(x), reference.v_proj(x))  # q's input: the fused output's columns
        x.add_(1.0)  # written in place since q read it: not taken from the cache
        assert torch.equal(attention.q_proj(y), reference.q_proj(y)) and torch.equal(attention.k_proj(x), reference.k_proj(x))


def test_the_fused_pack_follows_the_exact_path_and_moves(smollm2, eager_fusion):
    plain, fused = int4_block(smollm2), int4_block(smollm2)
    fuse_siblings(fused)
    x = torch.randn(1, 1, 576)
    first = run(fused, smollm2, x)
    set_exact(fused), set_exact(plain)
    assert torch.equal(run(fused, smollm2, x), run(plain, smollm2, x))  # the fp32 reference, unfused
    set_exact(fused, False)
    fused.to("cpu")  # a move packs again: the fused pack is rebuilt from the new packs
    assert torch.equal(run(fused, smollm2, x), first)
    group = fused.mlp.gate_proj.fusion
    assert all(m.weight_q._packed is view for m, view in zip(group.members, group._views, strict=True))


def int4_calls(block: torch.nn.Module, smollm2, x: torch.Tensor) -> int:
    """How many int4 kernel calls the graphs dynamo captures for the block's forward make."""
    return sum("_weight_int4pack_mm_for_cpu" in call for call in captured_calls(lambda h: run(block, smollm2, h), x))


def test_a_compiled_step_calls_the_kernel_once_per_sibling_group(smollm2):
    plain, fused = int4_block(smollm2), int4_block(smollm2)
    fuse_siblings(fused)
    x = torch.randn(1, 1, 576)
    expected = run(plain, smollm2, x)
    assert torch.equal(run(fused, smollm2, x), expected)  # eager: each sibling alone, on its view of the fused pack
    assert fused.self_attn.q_proj.fusion._pack is not None  # built then, ready for the compiled step
    assert int4_calls(plain, smollm2, x) == 7 and int4_calls(fused, smollm2, x) == 4  # q/k/v, o, gate/up, down
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(lambda h: run(fused, smollm2, h))(x)
    assert torch.allclose(compiled, expected, rtol=1e-4, atol=1e-5)  # inductor's own norms and attention round a little differently
    assert fused.self_attn.q_proj.fusion._cache is None
