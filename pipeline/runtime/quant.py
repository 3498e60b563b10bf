"""Integer quantization of a tensor: int8 or int4, symmetric or asymmetric, per channel or in groups.

Rows are output channels (dim 0); the rest of the tensor is flattened into
columns and split into groups of `group_size` (one group per row when None).
Scales are stored as float16 and zero points as uint8; int4 values are packed
two per byte. Pure functions: tensor in, `QuantizedData` out, and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch



@dataclass(frozen=True)
class QuantFormat:
    """How a tensor's integer codes are laid out: what the runtime needs to run them, as a plain dataclass.

    The recipe's `QuantizeConfig` (pydantic, build time) has the same attributes, so either can be passed
    to the functions here; `rounding` records how the codes were chosen and never changes how they run.
    """

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    rounding: str = "nearest"

    @classmethod
    def of(cls, config: QuantFormat | object) -> QuantFormat:
        """From anything with the four attributes (the spec's QuantizeConfig)."""
        rounding = getattr(config, "rounding", "nearest")
        return cls(int(config.bits), config.group_size, bool(config.symmetric), str(getattr(rounding, "value", rounding)))

    @classmethod
    def from_json(cls, data: dict) -> QuantFormat:
        """The manifest's form (the recipe's camelCase keys), as written by `to_json` and by earlier versions."""
        unknown = set(data) - {"bits", "groupSize", "symmetric", "rounding"}
        if unknown or data.get("bits") not in (4, 8):
            raise ValueError(f"invalid quantize_config {data!r}: expected bits 4 or 8, groupSize, symmetric, rounding")
        return cls(data["bits"], data.get("groupSize"), bool(data.get("symmetric", True)), data.get("rounding", "nearest"))

    def to_json(self) -> dict:
        return {"bits": self.bits, "groupSize": self.group_size, "symmetric": self.symmetric, "rounding": self.rounding}


@dataclass(frozen=True)
class QuantizedData:
    values: torch.Tensor  # int8 (rows, padded) for 8 bits; uint8 (rows, padded / 2) packed for 4 bits
    scale: torch.Tensor  # float16 (rows, groups)
    zero_point: torch.Tensor  # uint8 (rows, groups); empty when symmetric
    shape: tuple[int, ...]
    bits: int
    group_size: int  # columns per scale after padding

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.scale, self.zero_point))


def _layout(shape: tuple[int, ...], config: QuantFormat) -> tuple[int, int, int]:
    rows, columns = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
    group = config.group_size or columns
    group = min(group, columns) if config.group_size else columns
    if config.bits == 4 and group % 2:
        group += 1
    padded = math.ceil(columns / group) * group
    return rows, padded, group


def packed_shape(shape: tuple[int, ...], config: QuantFormat) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored tensors, so an empty module can be built before loading weights."""
    rows, padded, group = _layout(shape, config)
    groups = padded // group
    return {
        "values": (rows, padded // 2 if config.bits == 4 else padded),
        "scale": (rows, groups),
        "zero_point": (0,) if config.symmetric else (rows, groups),
        "group_size": (group,),
    }


def grouped_view(tensor: torch.Tensor, config: QuantFormat) -> torch.Tensor:
    """The tensor as float32 (rows, groups, group size), zero-padded to whole groups."""
    rows, padded, group = _layout(tuple(tensor.shape), config)
    flat = tensor.detach().float().reshape(rows, -1)
    flat = torch.nn.functional.pad(flat, (0, padded - flat.shape[1]))
    return flat.reshape(rows, padded // group, group)


def group_scales(grouped: torch.Tensor, config: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16, as stored) and zero point (float; empty when symmetric) of each group, from its range."""
    if config.symmetric:
        qmax = 2 ** (config.bits - 1) - 1
        scale = (grouped.abs().amax(-1) / qmax).clamp(min=1e-8).half()
        return scale, torch.empty(0, device=grouped.device)
    qmax = 2**config.bits - 1
    low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    scale = ((high - low) / qmax).clamp(min=1e-8).half()
    return scale, torch.round(-low / scale.float()).clamp(0, qmax)


def integer_codes(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, config: QuantFormat) -> torch.Tensor:
    """Round values to the integer grid their scales (and zero points) define: signed when symmetric, else 0..2^bits-1.
    `scale` and `zero` broadcast against `values` (a group's, or one column's per row)."""
    if config.symmetric:
        qmax = 2 ** (config.bits - 1) - 1
        return torch.round(values / scale.float()).clamp(-qmax, qmax)
    return (torch.round(values / scale.float()) + zero).clamp(0, 2**config.bits - 1)


def restored(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, config: QuantFormat) -> torch.Tensor:
    """The float values integer codes stand for: what `dequantize` gives back for them."""
    return (codes if config.symmetric else codes - zero) * scale.float()


def quantize(tensor: torch.Tensor, config: QuantFormat) -> QuantizedData:
    """Round to nearest, each group on the grid its own range sets."""
    grouped = grouped_view(tensor, config)
    scale, zero = group_scales(grouped, config)
    codes = integer_codes(grouped, scale[..., None], zero[..., None] if zero.numel() else zero, config)
    return pack(codes, scale, zero, tuple(tensor.shape), config)


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, ...], config: QuantFormat) -> QuantizedData:
    """Integer codes (rows, groups, group size) and their group scales as the stored tensors."""
    rows, padded, group = _layout(shape, config)
    stored = codes.reshape(rows, padded)
    if config.symmetric and config.bits == 4:
        stored = stored + 2 ** (config.bits - 1)  # int4 kept as 1..15 for packing
    if config.bits == 4:
        nibbles = stored.to(torch.uint8)
        values = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    else:
        values = stored.to(torch.int8) if config.symmetric else (stored - 128).to(torch.int8)
    zero_point = zero.to(torch.uint8) if not config.symmetric else torch.empty(0, dtype=torch.uint8, device=codes.device)
    return QuantizedData(values.contiguous(), scale.contiguous(), zero_point.contiguous(), shape, config.bits, group)


def dequantize(data: QuantizedData, symmetric: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float values the codes stand for, computed in `dtype` (codes and zero points are integers below
    256, exact in bf16 too, so a bf16 result is rounded once, as a cast of the fp32 one would be)."""
    rows = data.shape[0]
    if data.bits == 4:
        q = torch.stack([data.values & 0x0F, data.values >> 4], dim=-1).reshape(rows, -1).to(dtype)
        if symmetric:
            q = q - 8
    else:
        q = data.values.to(dtype) if symmetric else data.values.to(dtype) + 128
    grouped = q.reshape(rows, -1, data.group_size)
    if not symmetric:
        grouped = grouped - data.zero_point.to(dtype)[..., None]
    flat = (grouped * data.scale.to(dtype)[..., None]).reshape(rows, -1)
    columns = math.prod(data.shape[1:]) if len(data.shape) > 1 else 1
    return flat[:, :columns].reshape(data.shape)
