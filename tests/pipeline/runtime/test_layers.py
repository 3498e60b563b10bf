"""Every compressed layer: output equals the dense reconstruction of its factors; no dense weight inside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from krunch.decompose.conv import cp_conv, tucker2
from krunch.decompose.svd import truncated_svd
from krunch.decompose.tt import factorize, tt_svd
from krunch.runtime import build_layer, set_exact
from krunch.runtime.base import CompressedLayer, QuantizedTensor
from krunch.runtime.conv import CPConv2d, TuckerConv2d
from krunch.decompose.pivot import pivoted
from krunch.runtime.linear import LowRankLinear, MPOLinear, PivotedLowRankLinear
from krunch.runtime.quantized import QuantizedConv2d, QuantizedEmbedding, QuantizedLinear
from krunch.spec import QuantizeConfig

QUANTIZE = [None, QuantizeConfig(bits=8), QuantizeConfig(bits=4, group_size=32, symmetric=False)]


def linear_layers(source: nn.Linear, quantize: QuantizeConfig | None) -> list[CompressedLayer]:
    out_f, in_f = factorize(source.out_features, 3), factorize(source.in_features, 3)
    layers: list[CompressedLayer] = [
        LowRankLinear.from_factors(source, truncated_svd(source.weight, 32), quantize),
        PivotedLowRankLinear.from_factors(source, pivoted(truncated_svd(source.weight, 32)), quantize),
        MPOLinear.from_factors(source, tt_svd(source.weight, out_f, in_f, (12, 16)), quantize),
    ]
    if quantize is not None:
        layers.append(QuantizedLinear.from_dense(source, quantize))
    return layers


def conv_layers(source: nn.Conv2d, quantize: QuantizeConfig | None) -> list[CompressedLayer]:
    layers: list[CompressedLayer] = [
        TuckerConv2d.from_factors(source, tucker2(source.weight, (24, 16)), quantize),
        CPConv2d.from_factors(source, cp_conv(source.weight, 12), quantize),
    ]
    if quantize is not None:
        layers.append(QuantizedConv2d.from_dense(source, quantize))
    return layers


def assert_holds_no_dense_weight(layer: CompressedLayer, dense_shape: torch.Size) -> None:
    assert not hasattr(layer, "weight")
    for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
        assert tensor.numel() < torch.Size(dense_shape).numel() or isinstance(layer, (QuantizedLinear, QuantizedConv2d)), name


@pytest.mark.parametrize("quantize", QUANTIZE, ids=["fp32", "int8", "int4-asym"])
def test_linear_layers_match_their_dense_reconstruction(minilm, quantize):
    source = minilm.module.encoder.layer[1].intermediate.dense
    x = torch.randn(3, 5, source.in_features)
    for layer in linear_layers(source, quantize):
        set_exact(layer)  # the fp32 reference path; tests/pipeline/runtime/test_kernels.py checks the kernels
        with torch.no_grad():
            expected = F.linear(x, layer.to_dense(), source.bias)
            assert torch.allclose(layer(x), expected, atol=1e-5, rtol=1e-4), layer
        if not isinstance(layer, QuantizedLinear):
            assert_holds_no_dense_weight(layer, source.weight.shape)
        if quantize is not None:
            assert any(isinstance(m, QuantizedTensor) for m in layer.modules())


@pytest.mark.parametrize("quantize", QUANTIZE, ids=["fp32", "int8", "int4-asym"])
def test_conv_layers_match_their_dense_reconstruction(easyocr, quantize):
    source = easyocr.module.FeatureExtraction.ConvNet[6]  # 64 -> 128, 3x3, padding 1
    strided = nn.Conv2d(64, 128, 3, stride=2, padding=2, dilation=2)
    with torch.no_grad():
        strided.weight.copy_(source.weight)
        strided.bias.copy_(source.bias)
    x = torch.randn(2, 64, 13, 17)
    for conv in (source, strided):
        for layer in conv_layers(conv, quantize):
            with torch.no_grad():
                expected = F.conv2d(x, layer.to_dense(), conv.bias, conv.stride, conv.padding, conv.dilation)
                assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-4), layer
            if not isinstance(layer, QuantizedConv2d):
                assert_holds_no_dense_weight(layer, conv.weight.shape)


def test_quantized_embedding_looks_up_dequantized_rows():
    source = nn.Embedding(50, 24)
    layer = QuantizedEmbedding.from_dense(source, QuantizeConfig(bits=4, group_size=8))
    ids = torch.randint(0, 50, (3, 7))
    assert torch.equal(layer(ids), layer.to_dense()[ids])
    assert float((layer.to_dense() - source.weight).norm() / source.weight.norm()) < 0.15


@pytest.mark.parametrize("quantize", QUANTIZE, ids=["fp32", "int8", "int4-asym"])
def test_layers_rebuild_from_their_config_and_state(quantize):
    source = nn.Linear(96, 64)
    x = torch.randn(4, 96)
    for layer in linear_layers(source, quantize):
        rebuilt = build_layer(type(layer).__name__, layer.config())
        rebuilt.load_state_dict(layer.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(rebuilt(x), layer(x))


def test_build_layer_refuses_unknown_types():
    with pytest.raises(ValueError, match="unknown layer type 'os.system'"):
        build_layer("os.system", {})


def test_repr_says_what_was_done():
    source = nn.Linear(96, 64)
    layer = LowRankLinear.from_factors(source, truncated_svd(source.weight, 8), QuantizeConfig(bits=8))
    assert "method=svd" in repr(layer) and "rank=8" in repr(layer) and "int8" in repr(layer)


def test_a_layer_entry_written_before_the_kernels_loads_and_runs_on_them():
    """The manifest entry and tensor names an earlier krunch wrote (the recipe's QuantizeConfig as JSON)."""
    entry = {"in_features": 64, "out_features": 32, "bias": True,
             "quantize_config": {"bits": 4, "groupSize": 32, "symmetric": False, "rounding": "gptq"}}  # fmt: skip
    layer = build_layer("QuantizedLinear", entry)
    codes = torch.randint(0, 256, (32, 32), dtype=torch.uint8)
    state = {"bias": torch.randn(32), "weight_q.values": codes, "weight_q.scale": torch.rand(32, 2).half() / 10,
             "weight_q.zero_point": torch.randint(0, 16, (32, 2), dtype=torch.uint8)}  # fmt: skip
    layer.load_state_dict(state, strict=True)
    assert layer.config() == entry and layer.weight_q.kernel()[0].value == "int4pack"
    x = torch.randn(1, 64)
    with torch.no_grad():
        reference = F.linear(x, layer.to_dense(), state["bias"])
        assert float((layer(x) - reference).norm() / reference.norm()) < 0.01
