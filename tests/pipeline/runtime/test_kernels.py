"""The quantized kernels against the dequantize-then-matmul reference, on real SmolLM2 and MiniLM weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from krunch.runtime import Kernel, QuantFormat, set_exact
from krunch.runtime.kernels import PACKED_MAX_ROWS, int4_pack_is_permutation, transient_dtype
from krunch.runtime.linear import LowRankLinear
from krunch.runtime.quantized import QuantizedEmbedding, QuantizedLinear
from krunch.decompose.svd import truncated_svd
from tests.pipeline.runtime.graphs import captured_calls

FORMATS = {
    "int8": (QuantFormat(8), Kernel.INT8_CPU),
    "int8-asym": (QuantFormat(8, symmetric=False), Kernel.INT8_CPU),
    "int4-g32": (QuantFormat(4, 32), Kernel.INT4_CPU),
    "int4-g64-asym": (QuantFormat(4, 64, symmetric=False), Kernel.INT4_CPU),
    "int3-g64": (QuantFormat(3, 64), Kernel.DEQUANTIZE),  # no packed int3 / int2 kernel: the fallback runs them
    "int2-g64-asym": (QuantFormat(2, 64, symmetric=False), Kernel.DEQUANTIZE),
}
BF16_TOLERANCE = 0.01  # bf16 activations: about 3 significant digits per product, summed over hundreds


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def real_linears(smollm2, minilm) -> dict[str, torch.nn.Linear]:
    block = smollm2.module.model.layers[3]
    return {"smollm2 up_proj": block.mlp.up_proj, "smollm2 down_proj": block.mlp.down_proj,
            "smollm2 k_proj": block.self_attn.k_proj, "minilm query": minilm.module.encoder.layer[2].attention.self.query}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("rows", [1, PACKED_MAX_ROWS, 512])
def test_kernels_match_the_reference_on_real_layers(smollm2, minilm, name, rows):
    fmt, kernel = FORMATS[name]
    for label, source in real_linears(smollm2, minilm).items():
        layer = QuantizedLinear.from_dense(source, fmt)
        assert layer.weight_q.kernel()[0] is kernel, label
        x = torch.randn(rows, source.in_features) * 2
        with torch.no_grad():
            reference = F.linear(x, layer.to_dense(), source.bias)
            out = layer(x)
        assert layer.weight_q._packed is not None and layer.weight_q._packed.kernel is kernel
        assert relative(out, reference) < BF16_TOLERANCE, (label, relative(out, reference))
        set_exact(layer)
        with torch.no_grad():
            assert torch.allclose(layer(x), reference, atol=1e-5, rtol=1e-4)


def aten_ops(layer: torch.nn.Module, x: torch.Tensor) -> set[str]:
    """The aten ops in the graph dynamo captures for layer(x)."""
    return set(captured_calls(layer, x, fullgraph=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["int8", "int8-asym"])
def test_a_compiled_int8_row_is_an_fp32_reduction_over_the_codes(smollm2, minilm, name):
    """In a compiled graph one row multiplies as a reduction inductor fuses with the codes' conversion (the
    aten kernel is not in the graph), in fp32: the reference's output to fp32 rounding; two rows keep the
    kernel, and its bf16 rounding."""
    fmt, _ = FORMATS[name]
    for label, source in real_linears(smollm2, minilm).items():
        layer = QuantizedLinear.from_dense(source, fmt)
        with torch.no_grad():
            layer(torch.randn(1, source.in_features))  # packs the codes eagerly, as a decode's prefill does
        for rows in (1, 2):
            x = torch.randn(rows, source.in_features) * 2
            kernel_in_graph = any("_weight_int8pack_mm" in op for op in aten_ops(layer, x))
            assert kernel_in_graph == (rows > 1), (label, rows)
            torch._dynamo.reset()
            with torch.no_grad():
                compiled = torch.compile(layer, fullgraph=True)(x)
                reference = F.linear(x, layer.to_dense(), source.bias)
            error = relative(compiled, reference)
            assert error < 1e-5 if rows == 1 else 1e-4 < error < BF16_TOLERANCE, (label, rows, error)


@pytest.mark.parametrize("bits", [2, 3])
def test_narrow_embeddings_look_up_the_rows_they_store(smollm2, bits):
    source = smollm2.module.model.embed_tokens
    layer = QuantizedEmbedding.from_dense(source, QuantFormat(bits, 64, symmetric=False))
    ids = torch.tensor([[0, 5, 49151, 1234]])
    assert layer.weight_q.values.numel() == source.weight.numel() * bits // 8
    assert torch.equal(layer(ids)[0], layer.to_dense()[ids[0]])
    assert "dequantize" in layer.weight_q.kernel()[0].value


def test_packing_leaves_the_stored_tensors_and_config_unchanged():
    source = torch.nn.Linear(128, 64)
    layer = QuantizedLinear.from_dense(source, QuantFormat(4, 32))
    before = {key: value.clone() for key, value in layer.state_dict().items()}
    config = layer.config()
    with torch.no_grad():
        layer(torch.randn(1, 128))
    assert layer.weight_q._packed.kernel is Kernel.INT4_CPU
    after = layer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert layer.config() == config


def test_the_pack_is_rebuilt_after_loading_new_codes_and_never_pickled():
    import pickle

    first, second = torch.nn.Linear(64, 32), torch.nn.Linear(64, 32)
    layer = QuantizedLinear.from_dense(first, QuantFormat(8))
    other = QuantizedLinear.from_dense(second, QuantFormat(8))
    x = torch.randn(1, 64)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())
        assert torch.equal(layer(x), other(x))  # not the stale pack of the first weights
    clone = pickle.loads(pickle.dumps(layer))
    assert clone.weight_q._packed is None


def test_layouts_without_a_kernel_fall_back_and_say_why():
    grouped = QuantizedLinear.from_dense(torch.nn.Linear(64, 32), QuantFormat(8, 16))
    kernel, why = grouped.weight_q.kernel()
    assert kernel is Kernel.DEQUANTIZE and "groups" in why
    odd = QuantizedLinear.from_dense(torch.nn.Linear(64, 24), QuantFormat(4, 32))
    assert odd.weight_q.kernel()[0] is Kernel.DEQUANTIZE and "kernel=dequantize" in repr(odd)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(grouped(x), F.linear(x, grouped.to_dense(), grouped.bias), atol=1e-5)


def test_quantized_factors_of_a_low_rank_layer_run_on_the_kernel():
    source = torch.nn.Linear(256, 128)
    layer = LowRankLinear.from_factors(source, truncated_svd(source.weight, 32), QuantFormat(8))
    x = torch.randn(1, 256)
    with torch.no_grad():
        out = layer(x)
        assert layer.kernels() == {"right": "int8pack", "left": "int8pack"}
        assert relative(out, F.linear(x, layer.to_dense(), source.bias)) < BF16_TOLERANCE


def test_a_tied_head_shares_the_embedding_codes_and_their_pack():
    embedding = QuantizedEmbedding.from_dense(torch.nn.Embedding(96, 64), QuantFormat(8))
    head = QuantizedLinear(64, 96, False, embedding.quantize_config.to_json())
    head.weight_q = embedding.weight_q
    with torch.no_grad():
        logits = head(torch.randn(1, 64))
    assert logits.shape == (1, 96) and embedding.weight_q._packed is head.weight_q._packed


def test_tensor_train_inference_runs_on_whichever_is_cheaper_and_follows_changed_cores():
    from krunch.decompose.tt import factorize, tt_svd
    from krunch.runtime.linear import MPOLinear

    source = torch.nn.Linear(384, 1536)
    mpo = tt_svd(source.weight, factorize(1536, 3), factorize(384, 3), (32, 32))
    layer = MPOLinear.from_factors(source, mpo)
    assert layer.contraction_flops() > 1536 * 384  # the chain costs more than the dense matmul here
    assert layer.kernel(rows=1) == "merged" and layer.kernel(rows=512, training=True) == "merge"
    x = torch.randn(2, 384)
    with torch.no_grad():
        assert torch.allclose(layer(x), F.linear(x, layer.to_dense(), source.bias), atol=1e-5)
        layer.core1.mul_(0.5)  # an in-place change of a core (an optimizer step) invalidates the merged weight
        assert torch.allclose(layer(x), F.linear(x, layer.to_dense(), source.bias), atol=1e-5)
    layer.core0.requires_grad_(True)
    layer(x).sum().backward()  # training contracts with autograd: gradients reach the cores
    assert layer.core0.grad is not None


@pytest.mark.parametrize("fmt", [QuantFormat(8), QuantFormat(8, symmetric=False), QuantFormat(4, 32), QuantFormat(4, 64, False)],
                         ids=["int8", "int8-asym", "int4-g32", "int4-g64-asym"])
@pytest.mark.parametrize("rows", [1, 2, 4, 7])
def test_inputs_that_are_not_whole_kernel_tiles_are_padded(fmt, rows):
    """A rank-200 factor (200 inputs: not a multiple of 16, nor of 64): the kernel runs on zero-padded inputs."""
    layer = QuantizedLinear.from_dense(torch.nn.Linear(200, 64), fmt)
    assert layer.weight_q.kernel()[0] is not Kernel.DEQUANTIZE
    x = torch.randn(rows, 200)
    with torch.no_grad():
        reference = F.linear(x, layer.to_dense(), layer.bias)
        assert relative(layer(x), reference) < BF16_TOLERANCE


def test_the_int4_pack_holds_the_codes_once_and_gives_them_back_exactly(smollm2):
    """Once packed for the CPU int4 kernel the stored codes live only in the pack: the model holds them once,
    yet the state dict, a pickle, a copy, `.to()`, prefill's dequantized weight and embedding rows are what
    they were."""
    import copy
    import pickle

    from krunch.sizes import tensor_bytes

    source = smollm2.module.model.layers[3].mlp.up_proj
    layer = QuantizedLinear.from_dense(source, QuantFormat(4, 32, symmetric=False))
    stored = {key: value.clone() for key, value in layer.state_dict().items()}
    dense, unpacked_bytes = layer.to_dense(), tensor_bytes(layer)
    x = torch.randn(32, source.in_features)  # prefill rows: the transient weight comes from the pack
    dtype = transient_dtype()
    with torch.no_grad():
        expected = F.linear(x.to(dtype), layer.weight_q.dequantize(dtype)).float()  # from the stored codes
        out = layer(x)
    weight = layer.weight_q
    released = int4_pack_is_permutation()  # this CPU's pack layout (AVX-512 builds only rearrange the nibbles)
    assert weight._packed.kernel is Kernel.INT4_CPU and (weight.values.numel() == 0) == released
    if released:
        assert tensor_bytes(layer) == unpacked_bytes + weight._packed.scale.nbytes  # the codes once, plus the bf16 scale/zero pack
    assert torch.equal(out, expected) and torch.equal(layer.to_dense(), dense)
    for again in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer), layer):
        assert all(torch.equal(again.state_dict()[k], v) for k, v in stored.items()), again is layer
    assert (weight.values.numel() == 0) == released  # saving read the codes back without keeping them
    layer.to("cpu")
    assert torch.equal(weight.values, stored["weight_q.values"])  # .to() puts them back, to be packed for the device
    layer.load_state_dict(stored)
    with torch.no_grad():
        assert torch.equal(layer(x), expected) and (weight.values.numel() == 0) == released

    embedding = QuantizedEmbedding.from_dense(smollm2.module.model.embed_tokens, QuantFormat(4, 32))
    ids = torch.tensor([[0, 31, 32, 63, 64, 1234, 49151]])
    before = embedding(ids)
    embedding.weight_q.packed(torch.device("cpu"))  # as a tied LM head's first matmul does
    assert (embedding.weight_q.values.numel() == 0) == released and torch.equal(embedding(ids), before)
