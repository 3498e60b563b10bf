"""Integer quantization of a tensor: int8 or int4, symmetric or asymmetric, per channel or in groups.

Rows are output channels (dim 0); the rest of the tensor is flattened into
columns and split into groups of `group_size` (one group per row when None).
Scales are stored as float16 and zero points as uint8; narrower codes are
packed along each row: int4 two per byte, int2 four per byte, int3 eight per
three bytes. Pure functions: tensor in, `QuantizedData` out, and back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantFormat:
    """How a tensor's integer codes are laid out: what the runtime needs to run them, as a plain dataclass.

    The recipe's `QuantizeConfig` (pydantic, build time) has the same attributes, so either can be passed
    to the functions here; `rounding` and `grid` record how the codes and scales were chosen and never change
    how they run.
    """

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    rounding: str = "nearest"
    grid: str = "range"  # range: each group's scale from its min/max; fitted: `fitted_scales`

    @classmethod
    def of(cls, config: QuantFormat | object) -> QuantFormat:
        """From anything with these attributes (the spec's QuantizeConfig)."""
        rounding, grid = getattr(config, "rounding", "nearest"), getattr(config, "grid", "range")
        return cls(int(config.bits), config.group_size, bool(config.symmetric), str(getattr(rounding, "value", rounding)),
                   str(getattr(grid, "value", grid)))  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> QuantFormat:
        """The manifest's form (the recipe's camelCase keys), as written by `to_json` and by earlier versions."""
        unknown = set(data) - {"bits", "groupSize", "symmetric", "rounding", "grid"}
        if unknown or data.get("bits") not in BITS:
            raise ValueError(f"invalid quantize_config {data!r}: expected bits {', '.join(map(str, BITS))}, groupSize, symmetric, rounding, grid")
        return cls(data["bits"], data.get("groupSize"), bool(data.get("symmetric", True)), data.get("rounding", "nearest"),
                   data.get("grid", "range"))  # fmt: skip

    def to_json(self) -> dict:
        grid = {"grid": self.grid} if self.grid != "range" else {}  # manifests of range grids as before
        return {"bits": self.bits, "groupSize": self.group_size, "symmetric": self.symmetric, "rounding": self.rounding, **grid}


@dataclass(frozen=True)
class QuantizedData:
    values: torch.Tensor  # int8 (rows, padded) for 8 bits; uint8 (rows, padded * bits / 8) packed for 2-4 bits
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
    unit = packing(config.bits)[0]
    if group % unit:  # a group holds whole packed words
        group += unit - group % unit
    padded = math.ceil(columns / group) * group
    return rows, padded, group


def packing(bits: int) -> tuple[int, int]:
    """(codes, bytes) per packed word: int4 2 in 1 byte, int2 4 in 1, int3 8 in 3; int8 is not packed."""
    if bits == 8:
        return 1, 1
    word = bits * 8 // math.gcd(bits, 8)
    return word // bits, word // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (rows, n) below 2^bits, n a whole number of words, as uint8 (rows, n * bits / 8): the
    first code of a word in its lowest bits (int4: low nibble first, as the int4 kernel's pack reads it)."""
    per_word, word_bytes = packing(bits)
    rows = codes.shape[0]
    words = codes.to(torch.int32).reshape(rows, -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int32, device=codes.device) * bits
    packed = (words << shifts).sum(-1, dtype=torch.int32)
    parts = [(packed >> (8 * b)) & 0xFF for b in range(word_bytes)]
    return torch.stack(parts, dim=-1).reshape(rows, -1).to(torch.uint8)


def unpack_codes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The unsigned codes `pack_codes` packed, as uint8 (rows, n)."""
    if bits == 4:  # the hot path (prefill, embedding rows): two nibbles per byte without int32 words
        return torch.stack([values & 0x0F, values >> 4], dim=-1).reshape(values.shape[0], -1)
    per_word, word_bytes = packing(bits)
    rows = values.shape[0]
    parts = values.to(torch.int32).reshape(rows, -1, word_bytes)
    words = sum(parts[..., b] << (8 * b) for b in range(word_bytes))
    shifts = torch.arange(per_word, dtype=torch.int32, device=values.device) * bits
    return ((words[..., None] >> shifts) & (2**bits - 1)).reshape(rows, -1).to(torch.uint8)


def packed_shape(shape: tuple[int, ...], config: QuantFormat) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored tensors, so an empty module can be built before loading weights."""
    rows, padded, group = _layout(shape, config)
    groups = padded // group
    return {
        "values": (rows, padded * config.bits // 8),
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


FIT_SHRINKS = 20  # candidate ranges tried per group by `fitted_scales`, from the full range down to half of it,
# spaced more finely near the full range (where 8-bit grids find their optimum)


def fitted_scales(grouped: torch.Tensor, config: QuantFormat, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each group chosen to minimise its weighted squared rounding error, not to
    cover its range: the outermost values are often worth clipping so that the many small ones get finer
    levels (llama.cpp's k-quants search the same way; HQQ fits the same two numbers by another route).

    Each candidate range (the group's own, shrunk step by step) rounds the group once; the scale (and the
    integer zero point) are then refitted to those codes by weighted least squares, the group rounded again
    on the refitted grid, and the candidate with the least error kept: never worse than the range grid,
    which is the first candidate. `importance` weighs each column (the diagonal of the calibration inputs'
    Gram matrix: an input that is large in use costs more when its weight is off); None weighs all alike.
    """
    weights = torch.ones_like(grouped) if importance is None else importance.expand_as(grouped)
    best_scale, best_zero = group_scales(grouped, config)
    best_error = _weighted_error(grouped, best_scale, best_zero, weights, config)
    low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    for step in range(1, FIT_SHRINKS):
        shrink = 1 - (step / FIT_SHRINKS) ** 2 / 2
        if config.symmetric:
            scale = ((grouped.abs().amax(-1) * shrink) / (2 ** (config.bits - 1) - 1)).clamp(min=1e-8)
            zero = torch.empty(0, device=grouped.device)
        else:
            scale = ((high - low) * shrink / (2**config.bits - 1)).clamp(min=1e-8)
            zero = torch.round(-low * shrink / scale).clamp(0, 2**config.bits - 1)
        scale, zero = _refitted(grouped, weights, integer_codes(grouped, scale[..., None], _at(zero), config), scale, zero, config)
        error = _weighted_error(grouped, scale, zero, weights, config)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        if not config.symmetric:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _at(zero: torch.Tensor) -> torch.Tensor:
    """A per-group zero point broadcast over the group's values (empty stays empty: symmetric)."""
    return zero[..., None] if zero.numel() else zero


def _weighted_error(grouped: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, weights: torch.Tensor,
                    config: QuantFormat) -> torch.Tensor:  # fmt: skip
    codes = integer_codes(grouped, scale[..., None], _at(zero), config)
    return (weights * (grouped - restored(codes, scale[..., None], _at(zero), config)) ** 2).sum(-1)


def _refitted(grouped: torch.Tensor, weights: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
              config: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The least-squares scale (fp16, as stored) and integer zero point for fixed codes; a group the fit cannot
    improve (no weight, or a non-positive slope) keeps the candidate's."""
    if config.symmetric:
        slope = (weights * grouped * codes).sum(-1) / (weights * codes * codes).sum(-1).clamp(min=1e-30)
        return torch.where(slope > 1e-8, slope, scale).half(), zero
    # w ~ a q + b over the group, then the zero point -b/a rounded to an integer and a refitted for it
    total, q, w = weights.sum(-1), (weights * codes).sum(-1), (weights * grouped).sum(-1)
    qq, qw = (weights * codes * codes).sum(-1), (weights * codes * grouped).sum(-1)
    slope = (total * qw - q * w) / (total * qq - q * q).clamp(min=1e-30)
    fit = slope > 1e-8
    fitted_zero = torch.round(-(w - slope * q) / total.clamp(min=1e-30) / slope.clamp(min=1e-8)).clamp(0, 2**config.bits - 1)
    zero = torch.where(fit, fitted_zero, zero)
    shifted = codes - zero[..., None]
    slope = (weights * grouped * shifted).sum(-1) / (weights * shifted * shifted).sum(-1).clamp(min=1e-30)
    return torch.where(slope > 1e-8, slope, scale).half(), zero


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


def quantize(tensor: torch.Tensor, config: QuantFormat, importance: torch.Tensor | None = None) -> QuantizedData:
    """Round to nearest, each group on the grid its own range sets, or (grid fitted) the grid `fitted_scales`
    fits, weighing each column by `importance` (one number per column of the flattened tensor) when given."""
    grouped = grouped_view(tensor, config)
    if QuantFormat.of(config).grid == "fitted":
        weights = None if importance is None else grouped_view(importance.reshape(1, -1), config)
        scale, zero = fitted_scales(grouped, config, weights)
    else:
        scale, zero = group_scales(grouped, config)
    codes = integer_codes(grouped, scale[..., None], _at(zero), config)
    return pack(codes, scale, zero, tuple(tensor.shape), config)


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, ...], config: QuantFormat) -> QuantizedData:
    """Integer codes (rows, groups, group size) and their group scales as the stored tensors."""
    rows, padded, group = _layout(shape, config)
    stored = codes.reshape(rows, padded)
    if config.symmetric and config.bits < 8:
        stored = stored + 2 ** (config.bits - 1)  # e.g. int4 kept as 1..15 for packing
    if config.bits < 8:
        values = pack_codes(stored, config.bits)
    else:
        values = stored.to(torch.int8) if config.symmetric else (stored - 128).to(torch.int8)
    zero_point = zero.to(torch.uint8) if not config.symmetric else torch.empty(0, dtype=torch.uint8, device=codes.device)
    return QuantizedData(values.contiguous(), scale.contiguous(), zero_point.contiguous(), shape, config.bits, group)


def dequantize(data: QuantizedData, symmetric: bool, dtype: torch.dtype = torch.float32, codes: torch.Tensor | None = None) -> torch.Tensor:
    """The float values the codes stand for, computed in `dtype` (codes and zero points are integers below
    256, exact in bf16 too, so a bf16 result is rounded once, as a cast of the fp32 one would be). `codes`:
    the unsigned codes (rows, padded columns) of a packed width, already unpacked (from a kernel's pack)."""
    rows = data.shape[0]
    if data.bits < 8:
        q = (unpack_codes(data.values, data.bits) if codes is None else codes).to(dtype)
        if symmetric:
            q = q - 2 ** (data.bits - 1)
    else:
        q = data.values.to(dtype) if symmetric else data.values.to(dtype) + 128
    grouped = q.reshape(rows, -1, data.group_size)
    if not symmetric:
        grouped = grouped - data.zero_point.to(dtype)[..., None]
    flat = (grouped * data.scale.to(dtype)[..., None]).reshape(rows, -1)
    columns = math.prod(data.shape[1:]) if len(data.shape) > 1 else 1
    return flat[:, :columns].reshape(data.shape)
