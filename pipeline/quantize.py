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

from pipeline.spec import QuantizeConfig


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


def _layout(shape: tuple[int, ...], config: QuantizeConfig) -> tuple[int, int, int]:
    rows, columns = shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1
    group = config.group_size or columns
    group = min(group, columns) if config.group_size else columns
    if config.bits == 4 and group % 2:
        group += 1
    padded = math.ceil(columns / group) * group
    return rows, padded, group


def packed_shape(shape: tuple[int, ...], config: QuantizeConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored tensors, so an empty module can be built before loading weights."""
    rows, padded, group = _layout(shape, config)
    groups = padded // group
    return {
        "values": (rows, padded // 2 if config.bits == 4 else padded),
        "scale": (rows, groups),
        "zero_point": (0,) if config.symmetric else (rows, groups),
        "group_size": (group,),
    }


def quantize(tensor: torch.Tensor, config: QuantizeConfig) -> QuantizedData:
    shape = tuple(tensor.shape)
    rows, padded, group = _layout(shape, config)
    flat = tensor.detach().float().reshape(rows, -1)
    flat = torch.nn.functional.pad(flat, (0, padded - flat.shape[1]))
    grouped = flat.reshape(rows, padded // group, group)
    if config.symmetric:
        qmax = 2 ** (config.bits - 1) - 1
        scale = (grouped.abs().amax(-1) / qmax).clamp(min=1e-8).half()
        q = torch.round(grouped / scale.float()[..., None]).clamp(-qmax, qmax)
        zero_point = torch.empty(0, dtype=torch.uint8, device=tensor.device)
        stored = q + 2 ** (config.bits - 1) if config.bits == 4 else q  # int4 kept as 1..15 for packing
    else:
        qmax = 2**config.bits - 1
        low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
        scale = ((high - low) / qmax).clamp(min=1e-8).half()
        zero = torch.round(-low / scale.float()).clamp(0, qmax)
        q = (torch.round(grouped / scale.float()[..., None]) + zero[..., None]).clamp(0, qmax)
        zero_point = zero.to(torch.uint8)
        stored = q
    stored = stored.reshape(rows, padded)
    if config.bits == 4:
        nibbles = stored.to(torch.uint8)
        values = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    else:
        values = stored.to(torch.int8) if config.symmetric else (stored - 128).to(torch.int8)
    return QuantizedData(values.contiguous(), scale.contiguous(), zero_point.contiguous(), shape, config.bits, group)


def dequantize(data: QuantizedData, symmetric: bool) -> torch.Tensor:
    rows = data.shape[0]
    if data.bits == 4:
        q = torch.stack([data.values & 0x0F, data.values >> 4], dim=-1).reshape(rows, -1).float()
        if symmetric:
            q = q - 8
    else:
        q = data.values.float() if symmetric else data.values.float() + 128
    grouped = q.reshape(rows, -1, data.group_size)
    if not symmetric:
        grouped = grouped - data.zero_point.float()[..., None]
    flat = (grouped * data.scale.float()[..., None]).reshape(rows, -1)
    columns = math.prod(data.shape[1:]) if len(data.shape) > 1 else 1
    return flat[:, :columns].reshape(data.shape)
